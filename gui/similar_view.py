"""The signed-off cases most like the shown one, and one keystroke to open each.

A result lists them nearest first (``CaseResult.similar_cases``: the site's case index
when the case was scored), with the similarity of the two patient embeddings, the
reviewer's decision and what was confirmed for them. Alt+1 to Alt+5 open the first to
fifth in the result pane, wherever the focus is in the window; Enter or a double
click on a row does the same. The queue still selects the case it selected.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from appliance.results import DECISION_WORDS, latest_version
from gui.result_data import CaseView

OPEN_KEYS = tuple(f"Alt+{n}" for n in range(1, 6))
COLUMNS = ("Key", "Case", "Similarity", "Decision", "Confirmed")


class SimilarCases(QWidget):
    """The table of similar earlier cases; ``opened`` carries the version folder and
    case id of the one asked for."""

    opened = Signal(Path, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setAccessibleName("Similar earlier cases, signed off")
        self.table.verticalHeader().setVisible(False)
        # Rows as tall as their wrapped text: the confirmed findings are the point of a row.
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(True)
        header = self.table.horizontalHeader()
        for column in range(len(COLUMNS) - 1):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)
        self.table.cellActivated.connect(lambda row, _: self.open_row(row))
        self.table.cellDoubleClicked.connect(lambda row, _: self.open_row(row))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.note)
        layout.addWidget(self.table, 1)
        self._targets: list[tuple[Path | None, str]] = []

    def install_keys(self, owner: QWidget) -> None:
        """Alt+1 ... Alt+5 on ``owner`` (the result pane, shown while a result is):
        they open the rows whichever tab is in front."""
        for row, keys in enumerate(OPEN_KEYS):
            QShortcut(
                QKeySequence(keys),
                owner,
                lambda row=row: self.open_row(row),
                context=Qt.ShortcutContext.WindowShortcut,
            )

    def show_view(self, view: CaseView) -> None:
        result = view.result
        outbox = view.folder.parent.parent
        self._targets = []
        self.table.setRowCount(0)
        for row, similar in enumerate(result.similar_cases):
            latest = latest_version(outbox, similar.case_id)
            self._targets.append((latest.path if latest else None, similar.case_id))
            decision = DECISION_WORDS.get(similar.decision, similar.decision)
            key = OPEN_KEYS[row] if row < len(OPEN_KEYS) else ""
            cells = (key, similar.case_id, f"{similar.similarity:.2f}", decision)
            self.table.insertRow(row)
            for column, text in enumerate((*cells, similar.confirmed() or "-")):
                item = QTableWidgetItem(text)
                if latest is None:
                    item.setToolTip("This case's result is no longer in the outbox")
                self.table.setItem(row, column, item)
        if result.similar_cases:
            self.note.setText(
                f"Signed-off cases nearest by patient embedding when this case was scored; "
                f"{OPEN_KEYS[0]} to {OPEN_KEYS[min(len(result.similar_cases), 5) - 1]} open them."
            )
        elif result.patient_embedding is None:
            self.note.setText("The bundle that scored this case has no patient encoder.")
        else:
            self.note.setText("No signed-off case had a patient embedding when it was scored.")

    def open_row(self, row: int) -> None:
        if 0 <= row < len(self._targets):
            folder, case_id = self._targets[row]
            if folder is not None:
                self.opened.emit(folder, case_id)
