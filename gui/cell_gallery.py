"""The result pane's cell gallery: the crops of a result's cells, filtered to the
highest-attention cells, one class of the cell head, or the unsure cells; a cell opens
with Enter or a click, and F2 asks to re-label it (the main window saves the label)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QImage, QKeySequence, QPixmap, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from appliance.results import TopCell
from gui.pictures import ScaledImage
from gui.relabel_view import RELABEL_KEY
from gui.result_data import TOP_CELLS, UNSURE, CaseView, CellView, GalleryFilter
from gui.text import wrappable

GALLERY_ICON_PX = 96
HINTS = {
    TOP_CELLS: "The 20 cells the model weighed most.",
    UNSURE: "The cells the cell head was unsure of, the least sure first: a person decides.",
}
CLASS_HINT = "The surest cells of this class, the surest first."

ImageOf = Callable[[Path | None], QImage | None]


def class_words(cell: CellView, labels: dict[str, str]) -> str:
    """The cell head's call of a cell, in words ("" without a cell head)."""
    record = cell.cell
    if record.cell_class is None:
        return ""
    label = labels.get(record.cell_class, record.cell_class)
    sure = f", confidence {record.confidence:.2f}" if record.confidence is not None else ""
    return f"unsure: {label}?{sure}" if record.sure is False else f"{label}{sure}"


class CellGallery(QWidget):
    """The filter, the hint, and the cells' crops (or the gallery picture of an older
    result without them)."""

    opened = Signal(object)  # the CellView to show enlarged
    relabel_requested = Signal(object)  # the CellView to re-label

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._view: CaseView | None = None
        self._image: ImageOf = lambda _: None
        # Cells of the shown result re-labelled from this window: (slide, cell id) -> class.
        self.relabelled: dict[tuple[str, int], str] = {}
        self._with_place = False  # no crops to show: each caption names its slide and cell
        self.cells = QListWidget()
        self.cells.setViewMode(QListWidget.ViewMode.IconMode)
        self.cells.setIconSize(QSize(GALLERY_ICON_PX, GALLERY_ICON_PX))
        self.cells.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.cells.setMovement(QListWidget.Movement.Static)
        self.cells.setSpacing(4)
        self.cells.setUniformItemSizes(True)
        self.cells.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.cells.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.cells.setAccessibleName("Cells")
        self.cells.itemActivated.connect(self._open)
        self.cells.itemClicked.connect(self._open)
        self.cells.currentItemChanged.connect(self._update_relabel)
        QShortcut(
            QKeySequence(RELABEL_KEY),
            self.cells,
            self.request_relabel,
            context=Qt.ShortcutContext.WidgetShortcut,
        )
        self.picture = ScaledImage()
        self.picture.setAccessibleName("Gallery of the highest-attention cells")
        self.filter = QComboBox()
        self.filter.setAccessibleName("Cells shown: by attention, by class, unsure")
        self.filter.currentIndexChanged.connect(self._show_filter)
        shown_label = QLabel("Sh&ow:")
        shown_label.setBuddy(self.filter)
        self.relabel_button = QPushButton("Re-&label...")
        self.relabel_button.setToolTip(
            f"Give the selected cell another class, saved for training ({RELABEL_KEY})"
        )
        self.relabel_button.clicked.connect(self.request_relabel)
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        choice = QHBoxLayout()
        choice.addWidget(shown_label)
        choice.addWidget(self.filter, 1)
        choice.addWidget(self.relabel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(choice)
        layout.addWidget(self.hint)
        layout.addWidget(self.picture, 2)
        layout.addWidget(self.cells, 3)

    @property
    def _labels(self) -> dict[str, str]:
        return self._view.class_labels if self._view is not None else {}

    def show_view(self, view: CaseView, image: ImageOf) -> None:
        """A result's filters (highest attention, each class, unsure), then the first's
        cells; ``image`` gives a file's decoded picture (None when absent)."""
        self._view, self._image = view, image
        self.relabelled = {}
        self.filter.blockSignals(True)
        self.filter.clear()
        for choice in view.gallery_filters():
            self.filter.addItem(choice.text, choice)
        self.filter.blockSignals(False)
        self.filter.setVisible(self.filter.count() > 1)
        self.relabel_button.setVisible(view.result.differential is not None)
        self._show_filter()

    def show_filter(self, key: str) -> None:
        """Show the cells of one filter: TOP_CELLS, a class name or UNSURE."""
        for index in range(self.filter.count()):
            if self.filter.itemData(index).key == key:
                self.filter.setCurrentIndex(index)
                return
        raise KeyError(key)

    def _show_filter(self, *_: object) -> None:
        view, choice = self._view, self.filter.currentData()
        if view is None or not isinstance(choice, GalleryFilter):
            return
        cells = choice.cells
        self.cells.clear()
        have_crops = any(self._image(c.image) is not None for c in cells)
        picture = self._image(view.gallery) if choice.key == TOP_CELLS else None
        self.picture.setVisible(not have_crops and picture is not None)
        if picture is not None and not have_crops:
            self.picture.set_image(picture)
        self._with_place = not have_crops
        if have_crops:
            self.cells.setViewMode(QListWidget.ViewMode.IconMode)
            # A longer class name is elided under its crop; its tooltip has it whole.
            line = self.cells.fontMetrics()
            self.cells.setGridSize(
                QSize(
                    max(GALLERY_ICON_PX, line.horizontalAdvance("#20  0.00 %")) + 16,
                    GALLERY_ICON_PX + 2 * line.height() + 14,
                )
            )
        else:
            self.cells.setViewMode(QListWidget.ViewMode.ListMode)
            self.cells.setGridSize(QSize())
        for shown in cells:
            item = QListWidgetItem(self._caption(shown))
            image = self._image(shown.image)
            if image is not None:
                item.setIcon(QPixmap.fromImage(image))
            item.setData(Qt.ItemDataRole.UserRole, shown)
            item.setToolTip(self._tooltip(shown))
            self.cells.addItem(item)
        self.cells.setVisible(bool(cells))
        if not cells:
            self.hint.setText("No cells were scored for this case.")
        else:
            hint = HINTS.get(choice.key, CLASS_HINT) + " Click a cell, or select it and press Enter"
            if view.result.differential is not None:
                hint += f"; {RELABEL_KEY} re-labels it"
            self.hint.setText(hint + ".")
        self._update_relabel()

    def _class_line(self, shown: CellView) -> str:
        """The second line of a cell's caption: its class, unsure, or its new label."""
        relabelled = self.relabelled.get(shown.key)
        if relabelled is not None:
            return f"→ {self._labels.get(relabelled, relabelled)}"
        record = shown.cell
        if record.cell_class is None:
            return ""
        label = self._labels.get(record.cell_class, record.cell_class)
        return f"{label}?" if record.sure is False else label

    def _caption(self, shown: CellView) -> str:
        record = shown.cell
        if isinstance(record, TopCell):
            first = f"#{record.rank}  {record.attention * 100:.2f} %"
        else:
            first = f"{record.confidence:.2f}"
        if self._with_place:
            first += f"  ·  slide {record.slide}, cell {record.cell_id}"
        second = self._class_line(shown)
        return f"{first}\n{second}" if second else first

    def _tooltip(self, shown: CellView) -> str:
        record = shown.cell
        text = f"Cell {record.cell_id} on {record.slide}"
        if isinstance(record, TopCell):
            text += f": attention {record.attention:.4f}"
        words = class_words(shown, self._labels)
        text = f"{text}; {words}" if words else text
        relabelled = self.relabelled.get(shown.key)
        if relabelled is not None:
            text += f"; re-labelled {self._labels.get(relabelled, relabelled)} for training"
        return text

    def current_cell(self) -> CellView | None:
        item = self.cells.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None

    def _can_relabel(self, cell: CellView | None) -> bool:
        return (
            cell is not None
            and self._view is not None
            and self._view.result.differential is not None
            and cell.cell.cell_class is not None
        )

    def _update_relabel(self, *_: object) -> None:
        self.relabel_button.setEnabled(self._can_relabel(self.current_cell()))

    def request_relabel(self) -> None:
        """Ask for the selected cell's class (the main window opens the choice)."""
        cell = self.current_cell()
        if self._can_relabel(cell):
            self.relabel_requested.emit(cell)

    def mark_relabelled(self, key: tuple[str, int], cell_class: str, confirmation: str) -> None:
        """Show a cell's new label in the gallery (the result itself stays as it was), and
        where it was saved in the hint."""
        self.relabelled[key] = cell_class
        self.hint.setText(wrappable(confirmation))
        for row in range(self.cells.count()):
            item = self.cells.item(row)
            shown: CellView = item.data(Qt.ItemDataRole.UserRole)
            if shown.key == key:
                item.setText(self._caption(shown))
                item.setToolTip(self._tooltip(shown))

    def _open(self, item: QListWidgetItem) -> None:
        self.opened.emit(item.data(Qt.ItemDataRole.UserRole))
