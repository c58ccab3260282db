"""The differential panel of the result pane: the cell head's classes, each with its
colour (QuPath's), its cells and its percent of the classified cells with the Wilson
95 % interval; the unsure cells; the plasma-cell burden and the case's warnings.

The classes flow in as many columns as the pane's width holds (one on a narrow pane),
so the panel never makes the pane wider than its narrowest class and scrolls with the
page instead of squeezing.
"""

from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSize, Qt
from PySide6.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLayoutItem,
    QVBoxLayout,
    QWidget,
)

from appliance.results import BurdenRecord, ClassCount, Differential
from gui.text import wrappable

SWATCH_PX = 14
WARNING_STYLE = "background:#fff3cd; color:#5c3c00; border:1px solid #b36b00; padding:4px;"
BELOW_STYLE = "background:#fde7ea; color:#8c0018; border:1px solid #b00020; padding:4px;"
BURDEN_STYLE = "padding:4px; font-weight:bold;"


class FlowLayout(QLayout):
    """Items of one size left to right, wrapping to a new row when the width is used up
    (Qt's flow layout example): its minimum width is one item's."""

    def __init__(self, parent: QWidget | None = None, spacing: int = 4) -> None:
        super().__init__(parent)
        self._items: list[QLayoutItem] = []
        self._gap = spacing
        self.setContentsMargins(0, 0, 0, 0)

    def addItem(self, item: QLayoutItem) -> None:  # noqa: N802
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int) -> QLayoutItem | None:  # noqa: N802
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int) -> QLayoutItem | None:  # noqa: N802
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def expandingDirections(self) -> Qt.Orientation:  # noqa: N802
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:  # noqa: N802
        return True

    def heightForWidth(self, width: int) -> int:  # noqa: N802
        return self._arrange(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:  # noqa: N802
        super().setGeometry(rect)
        self._arrange(rect, move=True)

    def sizeHint(self) -> QSize:  # noqa: N802
        return self.minimumSize()

    def minimumSize(self) -> QSize:  # noqa: N802
        size = QSize()
        for item in self._items:
            size = size.expandedTo(item.minimumSize())
        return size

    def _arrange(self, rect: QRect, *, move: bool) -> int:
        """Place the items (when ``move``) in rows within ``rect``; the height they take."""
        x, y, row_height = rect.x(), rect.y(), 0
        for item in self._items:
            hint = item.sizeHint()
            if x > rect.x() and x + hint.width() > rect.x() + rect.width():
                x, y, row_height = rect.x(), y + row_height + self._gap, 0
            if move:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + self._gap
            row_height = max(row_height, hint.height())
        return y + row_height - rect.y()


def class_text(row: ClassCount, classified: int) -> str:
    """ "31 · 8.9 % (6.3-12.4)": the count and the percent of the classified cells with
    its interval."""
    if not classified:
        return f"{row.count}"
    return f"{row.count} · {row.percent:.1f} % ({row.low:.1f}-{row.high:.1f})"


class ClassChip(QWidget):
    """One class: its colour, its name, its figures."""

    def __init__(self, row: ClassCount, classified: int) -> None:
        super().__init__()
        self.setObjectName(f"class_{row.name}")
        swatch = QLabel()
        swatch.setFixedSize(SWATCH_PX, SWATCH_PX)
        red, green, blue = row.colour
        swatch.setStyleSheet(f"background: rgb({red}, {green}, {blue}); border: 1px solid #555;")
        self.name = QLabel(row.label)
        self.figures = QLabel(class_text(row, classified))
        for label in (self.name, self.figures):
            label.setTextFormat(Qt.TextFormat.PlainText)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(2, 1, 10, 1)
        layout.setSpacing(12)
        layout.addWidget(swatch)
        layout.addWidget(self.name)
        layout.addStretch(1)
        layout.addWidget(self.figures)
        words = f"{row.label}: {row.count} cells"
        if classified:
            words += f", {row.percent:.1f} % ({row.low:.1f} to {row.high:.1f} %)"
        self.setAccessibleName(words)
        self.setToolTip(words)


def summary_text(found: Differential) -> str:
    """ "348 of 389 cells classified · 41 unsure: below the operating point ..." """
    return (
        f"{found.classified:,} of {found.cells:,} cells classified · {found.unsure:,} unsure: "
        f"below the operating point (confidence {found.operating_point:.2f}, for "
        f"{100 * found.target_accuracy:.0f} % accuracy), for a person to look at"
    )


def burden_line(burden: BurdenRecord, warnings: tuple[str, ...]) -> tuple[str, str]:
    """(style, text) of the burden's line: a warning when the case carries it as one."""
    sentence = burden.sentence()
    if sentence in warnings:
        return WARNING_STYLE, f"Warning: {sentence}"
    return (BELOW_STYLE if burden.below else BURDEN_STYLE), sentence


class DifferentialPanel(QGroupBox):
    """The differential of the shown result (hidden when its bundle has no cell head)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Differential", parent)
        self.setObjectName("differential")
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.PlainText)
        self.classes = QWidget()
        self.flow = FlowLayout(self.classes)
        self.burden = QLabel()
        self.burden.setObjectName("burden")
        self.burden.setWordWrap(True)
        self.burden.setTextFormat(Qt.TextFormat.PlainText)
        self.warnings = QVBoxLayout()
        self.warnings.setSpacing(4)
        layout = QVBoxLayout(self)
        layout.setSpacing(6)
        # The burden and the warnings first: they decide whether the calls stand.
        layout.addWidget(self.summary)
        layout.addWidget(self.burden)
        layout.addLayout(self.warnings)
        layout.addWidget(self.classes)
        self.chips: list[ClassChip] = []

    def show_differential(
        self, found: Differential | None, burden: BurdenRecord | None, warnings: tuple[str, ...]
    ) -> None:
        for chip in self.chips:
            self.flow.removeWidget(chip)
            chip.deleteLater()
        self.chips = []
        while self.warnings.count():
            item = self.warnings.takeAt(0)
            if item is not None and item.widget() is not None:
                item.widget().deleteLater()
        self.setVisible(found is not None)
        if found is None:
            return
        self.summary.setText(summary_text(found))
        self.chips = [ClassChip(row, found.classified) for row in found.classes]
        # One width for every class, so that the flow reads as columns.
        width = max(chip.sizeHint().width() for chip in self.chips)
        for chip in self.chips:
            chip.setFixedWidth(width)
            self.flow.addWidget(chip)
        self.burden.setVisible(burden is not None)
        said = ()
        if burden is not None:
            style, text = burden_line(burden, warnings)
            self.burden.setStyleSheet(style)
            self.burden.setText(wrappable(text))
            said = (burden.sentence(),)
        for warning in warnings:
            if warning not in said:
                label = QLabel(wrappable(f"Warning: {warning}"))
                label.setObjectName("case_warning")
                label.setWordWrap(True)
                label.setTextFormat(Qt.TextFormat.PlainText)
                label.setStyleSheet(WARNING_STYLE)
                self.warnings.addWidget(label)
