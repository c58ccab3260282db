"""Re-labelling a cell in the window, all from the keyboard: the dialog that asks for
the cell's class (its number, or a few letters of its name, then Enter). What a label
writes is appliance.review.relabel's."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtGui import QColor, QImage, QKeyEvent, QPixmap
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QVBoxLayout,
    QWidget,
)

from appliance.results import ClassCount
from gui.result_data import CellView
from gui.text import wrappable

RELABEL_KEY = "F2"  # the platforms' key for "rename this item"
CROP_PX = 160


def head_call(cell: CellView, labels: dict[str, str]) -> str:
    """What the cell head called the cell, in words."""
    record = cell.cell
    if record.cell_class is None:
        return "The cell head did not classify it."
    label = labels.get(record.cell_class, record.cell_class)
    confidence = "" if record.confidence is None else f", confidence {record.confidence:.2f}"
    if record.sure is False:
        return f"The cell head was unsure: perhaps {label}{confidence}."
    return f"The cell head called it {label}{confidence}."


def matches(row: ClassCount, typed: str) -> bool:
    words = typed.casefold()
    return words in row.label.casefold() or words in row.name.casefold()


class RelabelDialog(QDialog):
    """One cell, its crop and the head's call, and the taxonomy's classes to choose from:
    a number picks that class, letters keep the classes whose name holds them (the first
    that starts with them chosen), the arrow keys move, Enter saves, Escape cancels."""

    def __init__(
        self,
        cell: CellView,
        image: QImage | None,
        classes: tuple[ClassCount, ...],
        training_dir: Path,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setObjectName("relabel_dialog")
        record = cell.cell
        self.cell = cell
        self.classes = classes
        where = f"cell {record.cell_id} of slide {record.slide}"
        self.setWindowTitle(f"Re-label {where}")
        picture = QLabel()
        picture.setAlignment(Qt.AlignmentFlag.AlignCenter)
        if image is not None:
            picture.setPixmap(
                QPixmap.fromImage(
                    image.scaled(
                        CROP_PX,
                        CROP_PX,
                        Qt.AspectRatioMode.KeepAspectRatio,
                        Qt.TransformationMode.SmoothTransformation,
                    )
                )
            )
        else:
            picture.setText("no crop")
        labels = {row.name: row.label for row in classes}
        about = QLabel(wrappable(f"{where[0].upper()}{where[1:]}. {head_call(cell, labels)}"))
        about.setWordWrap(True)
        self.typed = QLineEdit()
        self.typed.setAccessibleName("Class number or name")
        self.typed.setPlaceholderText("its number, or the start of its name")
        self.typed.installEventFilter(self)
        self.choices = QListWidget()
        self.choices.setAccessibleName("Classes of the cell head")
        for number, row in enumerate(classes, start=1):
            mark = "  (the head's call)" if row.name == record.cell_class else ""
            item = QListWidgetItem(f"{number}  {row.label}{mark}")
            swatch = QPixmap(14, 14)
            swatch.fill(QColor(*row.colour))
            item.setIcon(swatch)
            item.setData(Qt.ItemDataRole.UserRole, row.name)
            self.choices.addItem(item)
        note = QLabel(
            wrappable(
                "The result is not changed. The crop is saved in "
                f"{training_dir}/<class>/, the class folders `cytoedge train` reads, with "
                "who and when; a second label of this cell replaces the first."
            )
        )
        note.setWordWrap(True)
        note.setObjectName("relabel_note")
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        self.ok = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.ok.setText("Save label")
        self.ok.setDefault(True)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        side = QVBoxLayout()
        side.addWidget(about)
        class_line = QHBoxLayout()
        prompt = QLabel("&Class:")
        prompt.setBuddy(self.typed)
        class_line.addWidget(prompt)
        class_line.addWidget(self.typed, 1)
        side.addLayout(class_line)
        side.addWidget(self.choices, 1)
        top = QHBoxLayout()
        top.addWidget(picture, 0, Qt.AlignmentFlag.AlignTop)
        top.addLayout(side, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(top, 1)
        layout.addWidget(note)
        layout.addWidget(self.buttons)
        self.typed.textChanged.connect(self._typed)
        self.choices.currentRowChanged.connect(self._check)
        self.choices.itemActivated.connect(lambda _: self.accept())
        self.choices.setCurrentRow(-1)
        self._check()
        self.resize(620, 480)
        self.typed.setFocus()

    def _typed(self, text: str) -> None:
        typed = text.strip()
        if typed.isdigit():
            number = int(typed)
            for row in range(self.choices.count()):
                self.choices.item(row).setHidden(False)
            self.choices.setCurrentRow(number - 1 if 1 <= number <= len(self.classes) else -1)
            return
        shown = [row for row, c in enumerate(self.classes) if not typed or matches(c, typed)]
        for row in range(self.choices.count()):
            self.choices.item(row).setHidden(row not in shown)
        if not typed:
            return
        starting = [
            r for r in shown if self.classes[r].label.casefold().startswith(typed.casefold())
        ]
        best = (starting or shown or [-1])[0]
        self.choices.setCurrentRow(best)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802
        """The arrow keys in the typing field move through the classes shown."""
        if (
            watched is self.typed
            and event.type() == QEvent.Type.KeyPress
            and isinstance(event, QKeyEvent)
        ):
            step = {Qt.Key.Key_Down: 1, Qt.Key.Key_Up: -1}.get(Qt.Key(event.key()))
            if step is not None:
                self._move(step)
                return True
        return super().eventFilter(watched, event)

    def _move(self, step: int) -> None:
        shown = [r for r in range(self.choices.count()) if not self.choices.item(r).isHidden()]
        if not shown:
            return
        current = self.choices.currentRow()
        if current in shown:
            index = min(max(shown.index(current) + step, 0), len(shown) - 1)
        else:
            index = 0 if step > 0 else len(shown) - 1
        self.choices.setCurrentRow(shown[index])

    def _check(self, *_: object) -> None:
        item = self.choices.currentItem()
        self.ok.setEnabled(item is not None and not item.isHidden())

    def chosen(self) -> str | None:
        """The class name chosen, None while none is."""
        item = self.choices.currentItem()
        if item is None or item.isHidden():
            return None
        return str(item.data(Qt.ItemDataRole.UserRole))

    def accept(self) -> None:  # Enter with no class chosen saves nothing
        if self.chosen() is not None:
            super().accept()
