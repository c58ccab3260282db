"""The queue as a Qt item model: cases, expandable to their slides, newest first.

``QueueModel.apply`` merges a fresh snapshot of the store into the model with
row inserts, removals and ``dataChanged`` rather than a reset, so the view
keeps its selection, expansion and scroll position while jobs progress.
Snapshots are read by ``QueuePoller`` on its own thread: the UI thread never
touches SQLite.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from PySide6.QtCore import (
    QAbstractItemModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QRectF,
    QSize,
    Qt,
    QThread,
    QTimer,
    Signal,
    Slot,
)
from PySide6.QtGui import QBrush, QColor, QFont, QPainter
from PySide6.QtWidgets import (
    QApplication,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
)

from appliance.results import DECISION_WORDS
from appliance.site.pause_note import read_pause
from gui.review_state import ReviewIndex
from gui.store_reader import (
    CaseRow,
    QueueSnapshot,
    SlideRow,
    StoreReader,
    StoreUnavailableError,
)

log = logging.getLogger("cytoedge.gui")

AnyIndex = QModelIndex | QPersistentModelIndex
ROW_ROLE = Qt.ItemDataRole.UserRole + 1  # the CaseRow / SlideRow behind an index
PROGRESS_ROLE = Qt.ItemDataRole.UserRole + 2  # fraction 0..1 while running, else None
STATE_COLOURS = {
    "waiting": "#7a7a7a",
    "queued": "#1f5fa8",
    "running": "#b36b00",
    "done": "#1e7b34",
    "rejected": "#a31d1d",
    "failed": "#a31d1d",
}
REVIEW_COLOURS = {
    "to review": "#b36b00",
    "accepted": "#1e7b34",
    "rejected": "#a31d1d",
    "for FISH": "#1f5fa8",
}
STATE_WORDS = {
    "waiting": "waiting",
    "queued": "queued",
    "running": "running",
    "done": "done",
    "rejected": "rejected",
    "failed": "failed",
}


def state_text(state: str, stage: str) -> str:
    """What the State column says: the state, and for a running job its stage."""
    word = STATE_WORDS.get(state, state or "unknown")
    if state == "running" and stage:
        return f"{word}: {stage.replace('_', ' ')}"
    return word


def format_received(when: datetime | None, now: datetime | None = None) -> str:
    """Local time; the date only when it is not today."""
    if when is None:
        return ""
    local = when.astimezone()
    today = (now or datetime.now().astimezone()).astimezone().date()
    if local.date() == today:
        return local.strftime("%H:%M")
    return local.strftime("%d %b %H:%M")


class QueueModel(QAbstractItemModel):
    """Two-level tree: top rows are cases, children are that case's slides."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("Case / slide", "Received", "State", "Review", "Cells")
    NAME, RECEIVED, STATE, REVIEW, CELLS = range(5)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._cases: list[CaseRow] = []
        self._slides: dict[int, list[SlideRow]] = {}
        self._row_of: dict[int, int] = {}

    # --- reading -----------------------------------------------------------
    def case_at(self, index: AnyIndex) -> CaseRow | None:
        """The case of a case row or of a slide row."""
        if not index.isValid():
            return None
        if index.internalId() == 0:
            return self._cases[index.row()]
        return self._cases[self._row_of[index.internalId() - 1]]

    def slide_at(self, index: AnyIndex) -> SlideRow | None:
        if not index.isValid() or index.internalId() == 0:
            return None
        case_id = index.internalId() - 1
        return self._slides[case_id][index.row()]

    def case_index(self, case_id: int) -> QModelIndex:
        row = self._row_of.get(case_id)
        return QModelIndex() if row is None else self.index(row, 0)

    def cases(self) -> list[CaseRow]:
        return list(self._cases)

    # --- Qt model interface -----------------------------------------------
    def index(self, row: int, column: int, parent: AnyIndex = QModelIndex()) -> QModelIndex:  # noqa: B008
        if not self.hasIndex(row, column, parent):
            return QModelIndex()
        if not parent.isValid():
            return self.createIndex(row, column, 0)
        # A slide's internal id is its case's id + 1, which survives row moves.
        return self.createIndex(row, column, self._cases[parent.row()].id + 1)

    def parent(self, index: AnyIndex = QModelIndex()) -> QModelIndex:  # type: ignore[override]  # noqa: B008
        if not index.isValid() or index.internalId() == 0:
            return QModelIndex()
        return self.createIndex(self._row_of[index.internalId() - 1], 0, 0)

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008, N802
        if not parent.isValid():
            return len(self._cases)
        if parent.internalId() != 0 or parent.column() != 0:
            return 0
        return len(self._slides.get(self._cases[parent.row()].id, ()))

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return len(self.COLUMNS)

    def headerData(  # noqa: N802
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.COLUMNS[section]
        return None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        item: CaseRow | SlideRow | None = self.slide_at(index) or self.case_at(index)
        if item is None:
            return None
        column = index.column()
        if role == ROW_ROLE:
            return item
        state, _, progress = item.shown
        if role == PROGRESS_ROLE:
            return progress if state == "running" else None
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(item, column)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(item)
        if role == Qt.ItemDataRole.ForegroundRole and column == self.STATE:
            return QBrush(QColor(STATE_COLOURS.get(state, "#000000")))
        if role == Qt.ItemDataRole.ForegroundRole and column == self.REVIEW:
            return QBrush(QColor(REVIEW_COLOURS.get(self._display(item, column), "#000000")))
        if role == Qt.ItemDataRole.FontRole and isinstance(item, CaseRow) and column == self.NAME:
            font = QFont(QApplication.font())
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.AccessibleTextRole:
            return f"{self._display(item, self.NAME)}, {self._display(item, self.STATE)}"
        return None

    def _display(self, item: CaseRow | SlideRow, column: int) -> str:
        if column == self.NAME:
            return item.case_key if isinstance(item, CaseRow) else item.name
        if column == self.RECEIVED:
            when = item.received_at if isinstance(item, CaseRow) else item.seen_at
            return format_received(when)
        state, stage, progress = item.shown
        if column == self.STATE:
            text = state_text(state, stage)
            return f"{text} · {round(progress * 100)} %" if state == "running" else text
        if column == self.REVIEW:
            review = item.review if isinstance(item, CaseRow) else None
            return review.text if review is not None else ""
        if column == self.CELLS:
            cells = item.n_cells
            return "" if cells is None else f"{cells:,}"
        return ""

    def _tooltip(self, item: CaseRow | SlideRow) -> str:
        lines = [item.case_key if isinstance(item, CaseRow) else item.path]
        lines.append(self._display(item, self.STATE))
        if item.reason:
            lines.append(item.reason)
        if isinstance(item, CaseRow) and item.attempts > 1:
            lines.append(f"{item.attempts} attempts")
        review = item.review if isinstance(item, CaseRow) else None
        if review is not None and review.review is not None:
            words = DECISION_WORDS[review.review.decision]
            lines.append(f"{words} by {review.review.reviewer}")
        elif review is not None and review.waiting:
            lines.append("waits for review: " + "; ".join(review.waiting))
        return "\n".join(lines)

    # --- merging a snapshot -----------------------------------------------
    def apply(self, cases: Sequence[CaseRow]) -> None:
        """Bring the model in line with a snapshot ordered newest first."""
        new_ids = [c.id for c in cases]
        if len(set(new_ids)) != len(new_ids):
            raise ValueError("a queue snapshot lists the same case twice")
        wanted = set(new_ids)
        for row in reversed(range(len(self._cases))):
            if self._cases[row].id not in wanted:
                self.beginRemoveRows(QModelIndex(), row, row)
                removed = self._cases.pop(row)
                self._slides.pop(removed.id, None)
                self._reindex()
                self.endRemoveRows()
        kept = [c.id for c in self._cases]
        if kept != [i for i in new_ids if i in set(kept)]:
            # The order of known cases changed (a corrected receive time): rare, so reset.
            self.beginResetModel()
            self._cases = [c for c in cases]
            self._slides = {c.id: list(c.slides) for c in cases}
            self._reindex()
            self.endResetModel()
            return
        for row, case in enumerate(cases):
            if row >= len(self._cases) or self._cases[row].id != case.id:
                self.beginInsertRows(QModelIndex(), row, row)
                self._cases.insert(row, case)
                self._slides[case.id] = list(case.slides)
                self._reindex()
                self.endInsertRows()
                continue
            if self._cases[row] != case:
                self._cases[row] = case
                self.dataChanged.emit(self.index(row, 0), self.index(row, self.columnCount() - 1))
            self._merge_slides(row, case)

    def _merge_slides(self, row: int, case: CaseRow) -> None:
        parent = self.index(row, 0)
        current = self._slides.setdefault(case.id, [])
        wanted = {s.id for s in case.slides}
        for pos in reversed(range(len(current))):
            if current[pos].id not in wanted:
                self.beginRemoveRows(parent, pos, pos)
                current.pop(pos)
                self.endRemoveRows()
        for pos, slide in enumerate(case.slides):
            if pos >= len(current) or current[pos].id != slide.id:
                if any(s.id == slide.id for s in current[pos:]):
                    # Known slide out of place: drop the rows in between' ids ahead of it.
                    old = next(i for i in range(pos, len(current)) if current[i].id == slide.id)
                    self.beginMoveRows(parent, old, old, parent, pos)
                    current.insert(pos, current.pop(old))
                    self.endMoveRows()
                else:
                    self.beginInsertRows(parent, pos, pos)
                    current.insert(pos, slide)
                    self.endInsertRows()
                    continue
            if current[pos] != slide:
                current[pos] = slide
                self.dataChanged.emit(
                    self.index(pos, 0, parent), self.index(pos, self.columnCount() - 1, parent)
                )

    def _reindex(self) -> None:
        self._row_of = {case.id: row for row, case in enumerate(self._cases)}


class QueueDelegate(QStyledItemDelegate):
    """Roomier rows, and a progress bar with the stage in the State cell of running rows."""

    def sizeHint(self, option: QStyleOptionViewItem, index: AnyIndex) -> QSize:  # noqa: N802
        hint = super().sizeHint(option, index)
        width = hint.width() + 8
        if index.data(PROGRESS_ROLE) is not None and index.column() == QueueModel.STATE:
            width = option.fontMetrics.horizontalAdvance(self.bar_text(index)) + 24
        return QSize(width, max(hint.height(), option.fontMetrics.height() + 12))

    @staticmethod
    def bar_text(index: AnyIndex) -> str:
        """The bar itself says "running"; its text is the stage and the percentage."""
        return str(index.data()).removeprefix("running: ")

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: AnyIndex) -> None:
        fraction = index.data(PROGRESS_ROLE)
        if fraction is None or index.column() != QueueModel.STATE:
            super().paint(painter, option, index)
            return
        # Drawn by hand: styles disagree on where a progress bar's text goes.
        painter.save()
        if option.state & QStyle.StateFlag.State_Selected:
            painter.fillRect(option.rect, option.palette.highlight())
        track = QRectF(option.rect.adjusted(3, 4, -3, -4))
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(QColor("#9a9a9a"))
        painter.setBrush(QColor("#f4f4f4"))
        painter.drawRoundedRect(track, 3, 3)
        done = QRectF(track)
        done.setWidth(track.width() * min(1.0, max(0.0, float(fraction))))
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor("#f2c46d"))
        painter.drawRoundedRect(done, 3, 3)
        painter.setPen(QColor("#1a1a1a"))
        text = option.fontMetrics.elidedText(
            self.bar_text(index), Qt.TextElideMode.ElideMiddle, int(track.width()) - 6
        )
        painter.drawText(track, Qt.AlignmentFlag.AlignCenter, text)
        painter.restore()


class QueuePoller(QObject):
    """Polls the store on a worker thread and emits each changed snapshot.

    Lives in its own QThread (see ``start_polling``): a slow disk or a store in
    the middle of a checkpoint can delay a snapshot, never the window.
    """

    snapshot = Signal(object)  # QueueSnapshot
    unavailable = Signal(str)  # one-line reason, emitted when it changes
    paused = Signal(str)  # why the service holds its work ("" when it does not), on change

    def __init__(self, store_path: Path, reviews: ReviewIndex, interval_ms: int = 1000) -> None:
        super().__init__()
        self._reader = StoreReader(store_path)
        self._state_dir = store_path.parent  # the service's pause note is beside the store
        self._paused = ""
        self._reviews = reviews
        self._interval_ms = interval_ms
        self._timer: QTimer | None = None
        self._last_problem: str | None = None
        self._queue: QueueSnapshot | None = None  # the store's last, before review states

    @Slot()
    def start(self) -> None:
        self._timer = QTimer(self)
        self._timer.setInterval(self._interval_ms)
        self._timer.timeout.connect(self.poll_now)
        self._timer.start()
        self.poll_now()

    @Slot()
    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._reader.close()

    @Slot()
    def poll_now(self) -> None:
        # Read apart from the store: on a full disk the store does not change.
        paused = read_pause(self._state_dir).reason
        if paused != self._paused:
            self._paused = paused
            self.paused.emit(paused)
        try:
            snapshot = self._reader.poll()
        except StoreUnavailableError as exc:
            if str(exc) != self._last_problem:
                self._last_problem = str(exc)
                log.info("queue: %s", exc)
                self.unavailable.emit(str(exc))
            return
        if self._last_problem is not None:
            self._last_problem = None
            self.unavailable.emit("")
        # Sign-offs live in result versions and the audit trail, not in the store.
        reviews_changed = self._reviews.refresh()
        if snapshot is None and not reviews_changed:
            return
        self._queue = snapshot or self._queue
        if self._queue is not None:
            self.snapshot.emit(self._reviews.annotate(self._queue))


class PollingThread:
    """A QueuePoller running on its own QThread, started and stopped as one."""

    def __init__(self, store_path: Path, reviews: ReviewIndex, interval_ms: int = 1000) -> None:
        self.thread = QThread()
        self.thread.setObjectName("cytoedge-queue-poller")
        self.poller = QueuePoller(store_path, reviews, interval_ms)
        self.poller.moveToThread(self.thread)
        self.thread.started.connect(self.poller.start)
        self.thread.finished.connect(self.poller.stop)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.quit()
        self.thread.wait(5000)
