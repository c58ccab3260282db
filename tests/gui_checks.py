"""What "nothing is cut off" means for the window, checked the same way offscreen and on a
real X display (tests/test_gui_window.py, tests/test_gui_xcb.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
from PySide6.QtCore import QPoint, QRect, Qt
from PySide6.QtWidgets import (
    QAbstractButton,
    QApplication,
    QLabel,
    QMainWindow,
    QSizePolicy,
    QTabBar,
    QWidget,
)

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


def clipped_once_settled(window: QWidget, timeout_s: float = 3.0) -> list:
    """``clipped(window)`` once the window's layout has settled.

    A new result is laid out over several event-loop passes (a wrapping label reaches
    its height on the second), and on a loaded machine or a real X server those passes
    take longer than any fixed wait. What a person sees is the settled window, so this
    runs the event loop for up to ``timeout_s`` until nothing is clipped, then reports
    what still is.
    """
    deadline = time.monotonic() + timeout_s
    while (found := clipped(window)) and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    return found


def result_parts(window: QMainWindow) -> list[QWidget]:
    """What a reviewer must reach on a shown result: its banners, the review bar's text
    and buttons, every call's name, bar, threshold and call, and the status bar."""
    pane = window.pane  # type: ignore[attr-defined]
    banners = [pane.banner_box.itemAt(i).widget() for i in range(pane.banner_box.count())]
    grid = pane.predictions_grid
    calls = [grid.itemAt(i).widget() for i in range(grid.count())]
    bar = pane.review_bar
    parts = [*banners, bar.text, *bar.buttons.values(), *calls, window.statusBar()]
    return [w for w in parts if w is not None and w.isVisibleTo(window)]


def out_of_reach(window: QMainWindow, widgets: Iterable[QWidget]) -> list[str]:
    """The widgets a person cannot bring into view: cut by the window's edges, or inside
    the result page where its scroll area cannot show them whole."""
    scroll = window.pane.scroll  # type: ignore[attr-defined]
    found = []
    for widget in widgets:
        inside = scroll.widget().isAncestorOf(widget)
        frame: QWidget = scroll.viewport() if inside else window
        if inside:
            scroll.ensureWidgetVisible(widget, 0, 0)
        shown = QRect(widget.mapTo(frame, QPoint(0, 0)), widget.size())
        where = QRect(frame.mapTo(window, QPoint(0, 0)), frame.size())
        if not (frame.rect().contains(shown) and window.rect().contains(where)):
            text = widget.text() if isinstance(widget, (QLabel, QAbstractButton)) else ""
            found.append(f"{type(widget).__name__} {text or widget.accessibleName()}".strip())
    return found


@contextmanager
def virtual_display(screen: str = "1920x1080") -> Iterator[str]:
    """A virtual X server (Xvfb) of one ``WIDTHxHEIGHT`` screen on the first free display
    number: its name (":N")."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (packaging/system-deps.sh installs it)")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{screen}x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read) as handle:
            number = handle.readline().strip()  # written once the server accepts clients
        if not number:
            pytest.fail("Xvfb started but gave no display number")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(10)
