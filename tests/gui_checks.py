"""What "nothing is cut off" means for the window, checked the same way offscreen and on a
real X display (tests/test_gui_window.py, tests/test_gui_xcb.py)."""

from __future__ import annotations

from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QAbstractButton, QLabel, QSizePolicy, QTabBar, QWidget

IGNORED = QSizePolicy.Policy.Ignored


def clipped(window: QWidget) -> list[tuple[str, str, int]]:
    """Every visible text that does not fit where it is drawn: (what, text, width).

    - a one-line label or a button narrower than its text;
    - a wrapping label squeezed below the height its lines need at its width;
    - any label or button reaching past the window's right edge;
    - a tab narrower than its title;
    - the result page wider than the scroll area that shows it;
    - a queue column narrower than what it holds (a name longer than the column's
      maximum is elided by design: its tooltip holds it whole).
    """
    found: list[tuple[str, str, int]] = []
    right = window.width()
    for widget in window.findChildren(QLabel) + window.findChildren(QAbstractButton):
        if not widget.isVisibleTo(window) or widget.width() == 0:
            continue
        text = widget.text()
        edge = widget.mapTo(window, QPoint(widget.width(), 0)).x()
        if edge > right + 1:
            found.append(("past the right edge", text, edge))
        if isinstance(widget, QLabel) and (
            widget.pixmap() is not None and not widget.pixmap().isNull()
        ):
            continue
        if isinstance(widget, QLabel) and widget.wordWrap():
            needed = widget.heightForWidth(widget.width())
            if widget.height() < needed:
                found.append(("squeezed", text, widget.height()))
        elif (
            isinstance(widget, QLabel) and widget.sizePolicy().horizontalPolicy().name == "Ignored"
        ):
            continue  # a picture's frame (ScaledImage): its text is a placeholder
        elif widget.width() < widget.minimumSizeHint().width():
            found.append((type(widget).__name__, text, widget.width()))
    for bar in window.findChildren(QTabBar):
        for tab in range(bar.count()):
            title = bar.tabText(tab).replace("&", "")
            if bar.tabRect(tab).width() < bar.fontMetrics().horizontalAdvance(title):
                found.append(("tab", title, bar.tabRect(tab).width()))
    scroll = getattr(getattr(window, "pane", None), "scroll", None)
    if scroll is not None and scroll.isVisibleTo(window):
        page, viewport = scroll.widget(), scroll.viewport()
        if page.width() > viewport.width() or page.minimumSizeHint().width() > viewport.width():
            found.append(("result page wider than its pane", "", page.minimumSizeHint().width()))
    queue = getattr(window, "queue", None)
    if queue is not None:
        header = queue.header()
        for column in range(queue.model().columnCount()):
            wanted = min(queue.sizeHintForColumn(column), header.maximumSectionSize())
            if header.sectionSize(column) < wanted:
                title = str(queue.model().headerData(column, Qt.Orientation.Horizontal))
                found.append(("queue column", title, header.sectionSize(column)))
    return found
