"""The technician's window: the queue on the left, the selected case's result on the right."""

from __future__ import annotations

import html
import itertools
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from PySide6.QtCore import QMetaObject, QModelIndex, QObject, Qt, QThreadPool, QUrl, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDesktopServices, QKeySequence, QResizeEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSplitter,
    QTreeView,
    QVBoxLayout,
    QWidget,
)

from appliance.config import AuditConfig, Config, PathsConfig, WatchConfig
from appliance.results import DECISION_WORDS
from appliance.review.relabel import RelabelError, save_cell_label
from appliance.review.sign_off import ReviewError, SignOff, login_name, sign_off
from appliance.service.audit import AUDIT_FILE, AuditLog
from appliance.service.store import JobStore, StoreError
from gui.models import PollingThread, QueueDelegate, QueueModel, format_received
from gui.relabel_view import RelabelDialog
from gui.result_data import CellView
from gui.result_view import ResultPane
from gui.review_state import SHOWS_RESULT, ReviewIndex, case_result_folder
from gui.review_view import DECISIONS, SignOffDialog
from gui.store_reader import CaseRow, QueueSnapshot, ServiceInfo
from runtime.bundle_signer import read_record

STALE_HEARTBEAT_S = 30.0
# Narrower than this, the queue is stacked above the result: side by side, neither
# the queue's columns nor the result's calls would fit (a 1024 px screen).
SIDE_BY_SIDE_PX = 1200
SCORE_NOW_KEYS = "Ctrl+Shift+N"


class ServiceControl(Protocol):
    """A service running in this process, as the window may steer it."""

    @property
    def paused(self) -> bool: ...

    def set_paused(self, paused: bool) -> None: ...


class _Relay(QObject):
    """Carries a background job's one-line outcome back to the UI thread."""

    done = Signal(bool, str)
    signed = Signal(bool, str, str, str)  # ok, one line, the new version folder, the case
    relabelled = Signal(bool, str, object, str)  # ok, one line, (slide, cell id), class


def service_text(service: ServiceInfo | None, now: datetime | None = None, paused: str = "") -> str:
    """The status line; ``paused``: why the service holds its work (its pause note)."""
    if paused and service is not None:
        return f"Service on {service.host}: {paused}" if service.host else f"Service: {paused}"
    if service is None:
        return "No service has used this job store yet."
    moment = now or datetime.now().astimezone()
    where = f"on {service.host}" if service.host else ""
    if service.heartbeat_at is None:
        return f"Service {where}: state unknown"
    age = (moment - service.heartbeat_at).total_seconds()
    if age > STALE_HEARTBEAT_S:
        seen = service.heartbeat_at.astimezone().strftime("%d %b %H:%M")
        return f"Service {where} not responding (last seen {seen})"
    parts = [f"Service {where} running", service.bundle, service.backend]
    return " · ".join(p for p in parts if p)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def collecting_text(case: CaseRow, quiet_s: float, now: datetime | None = None) -> str:
    """When the service scores a case that is still collecting slides: once every slide
    is processed, and it holds `.ready` (or Score now was asked) or no new slide came
    for ``quiet_s`` (``watch.case_quiet_seconds``; docs/service.md)."""
    moment = now or datetime.now().astimezone()
    arriving = [s.name for s in case.slides if s.state == "waiting"]
    pending = any(s.state in ("waiting", "queued", "running") for s in case.slides)
    first = (
        f"Waiting for the scan files to finish arriving ({', '.join(arriving)}). "
        if arriving
        else ""
    )
    due = (case.last_slide_at or moment) + timedelta(seconds=quiet_s)
    rule = f"unless more slides arrive (it waits {_duration(quiet_s)} after its last slide)"
    if not case.collecting:
        then = "once its slides are processed" if pending else "as soon as the service takes it up"
        return f"{first}It will be scored {then}."
    if pending and due > moment:
        return (
            f"{first}Once its slides are processed it will be scored, at "
            f"{format_received(due, moment)} at the earliest, {rule}."
        )
    if pending:
        return f"{first}It will be scored once its slides are processed, {rule}."
    if due <= moment:
        return "It will be scored as soon as the service takes it up."
    return f"It will be scored at {format_received(due, moment)} {rule}."


def read_about(bundle_dir: Path | None, service: ServiceInfo | None, version: str) -> str:
    """Rich text for the About box: software version and the bundle's provenance."""
    lines = [f"<h3>cytoedge {version}</h3>", "<p>Offline hematology slide scoring.</p>"]
    if service is not None:
        lines.append(
            f"<p>Service: {service.bundle or 'no bundle'} on {service.backend or '?'}, "
            f"software {service.software_version or '?'}</p>"
        )
    manifest = bundle_dir / "bundle.json" if bundle_dir else None
    try:
        bundle = json.loads(manifest.read_text(encoding="utf-8")) if manifest else None
    except (OSError, ValueError) as exc:
        bundle = None
        lines.append(f"<p>Bundle manifest not readable: {exc}</p>")
    if bundle is None:
        if manifest is not None and not manifest.exists():
            lines.append(f"<p>No bundle at {bundle_dir}.</p>")
        return "".join(lines)
    use = str(bundle.get("intended_use", "?"))
    lines.append(
        f"<p><b>Bundle</b> {bundle.get('name', '?')} {bundle.get('version', '')} · "
        f"intended use: <b>{use}</b> · created {bundle.get('created', '?')}</p>"
    )
    if use == "demo":
        lines.append("<p style='color:#b00020'><b>Demo model, not for diagnosis.</b></p>")
    signed = read_record(bundle_dir) if bundle_dir else None
    if signed is not None and signed.signer is not None:
        lines.append(f"<p>Signed by {html.escape(str(signed.signer))}</p>")
    elif signed is not None and signed.warning:
        lines.append(f"<p style='color:#8a6d00'><b>{signed.warning.capitalize()}</b></p>")
    provenance = bundle.get("provenance") or {}
    rows = []
    for key, value in provenance.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        rows.append(f"<tr><td><b>{key.replace('_', ' ')}</b></td><td>{value}</td></tr>")
    if rows:
        lines.append("<table cellpadding='2'>" + "".join(rows) + "</table>")
    return "".join(lines)


def _pane_key(case: CaseRow) -> tuple[object, ...]:
    """What the result pane shows of a case: it is redrawn only when this changes."""
    waiting = tuple(s.state for s in case.slides) if case.state == "waiting" else ()
    return (case.id, case.shown, case.result_dir, case.review, case.collecting, waiting)


class MainWindow(QMainWindow):
    def __init__(
        self,
        store_path: Path,
        outbox: Path,
        *,
        bundle_dir: Path | None = None,
        data_dir: Path | None = None,
        fhir_outbox: Path | None = None,
        training_dir: Path | None = None,
        service: ServiceControl | None = None,
        version: str = "unknown",
        poll_ms: int = 1000,
        case_quiet_seconds: float = WatchConfig.case_quiet_seconds,
        audit_max_bytes: int = AuditConfig.max_bytes,
    ) -> None:
        super().__init__()
        self.store_path = store_path
        self.outbox = outbox
        self.bundle_dir = bundle_dir
        # The store is <data_dir>/state/jobs.sqlite, the audit trail beside it.
        self.data_dir = data_dir or store_path.parent.parent
        self.audit_path = store_path.parent / AUDIT_FILE
        self.audit_max_bytes = audit_max_bytes  # [audit] max_bytes: when it is rotated
        self.fhir_outbox = fhir_outbox
        # Where re-labelled cells go (paths.training_cells), by the configuration's default.
        self.training_dir = training_dir or (
            Config(paths=PathsConfig(data_dir=str(self.data_dir))).training_cells_dir
        )
        self.service = service
        self.version = version
        self.case_quiet_seconds = case_quiet_seconds
        self.service_info: ServiceInfo | None = None
        self.reviewer = ""  # confirmed in this session's first sign-off
        self._shown_case: CaseRow | None = None
        self.setWindowTitle("cytoedge")
        self.model = QueueModel(self)
        self.queue = self._build_queue_view()
        self.pane = ResultPane()
        self.relay = _Relay(self)
        self.relay.done.connect(self._background_done)
        self.relay.signed.connect(self._signed)
        self.relay.relabelled.connect(self._relabelled)
        self.pane.review_bar.decided.connect(self.ask_sign_off)
        self.pane.gallery.relabel_requested.connect(self.ask_relabel)

        buttons = self._build_buttons()
        left = QWidget()
        left_layout = QVBoxLayout(left)
        title = QLabel("&Queue")
        title.setBuddy(self.queue)
        title.setStyleSheet("font-size:15pt; font-weight:bold;")
        heading = QHBoxLayout()
        heading.addWidget(title)
        heading.addStretch(1)
        heading.addWidget(self.review_filter)
        left_layout.addLayout(heading)
        left_layout.addWidget(self.queue, 1)
        left_layout.addLayout(buttons)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.pane)
        splitter.setStretchFactor(0, 2)
        splitter.setStretchFactor(1, 3)
        splitter.setChildrenCollapsible(False)
        self.setCentralWidget(splitter)
        self.splitter = splitter
        self._arrange(side_by_side=True)
        self.status_label = QLabel()
        self.statusBar().addWidget(self.status_label, 1)
        self._set_tab_order()

        # Owned by the polling thread once it runs; before that, by whoever applies snapshots.
        self.reviews = ReviewIndex(outbox, self.data_dir, self.audit_path)
        self.polling = PollingThread(store_path, self.reviews, poll_ms)
        self.polling.poller.snapshot.connect(self.apply_snapshot)
        self.polling.poller.unavailable.connect(self._store_problem)
        self.polling.poller.paused.connect(self._paused)
        self.pause_reason = ""
        self._update_buttons()

    # --- building ---------------------------------------------------------------
    def _build_queue_view(self) -> QTreeView:
        view = QTreeView()
        view.setModel(self.model)
        view.setItemDelegate(QueueDelegate(view))
        view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        view.setAlternatingRowColors(True)
        view.setUniformRowHeights(True)
        view.setAllColumnsShowFocus(True)
        view.setAccessibleName("Queue of cases and slides")
        header = view.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(QueueModel.NAME, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(QueueModel.RECEIVED, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(QueueModel.STATE, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(QueueModel.REVIEW, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(QueueModel.CELLS, QHeaderView.ResizeMode.ResizeToContents)
        # A long case name is elided (its tooltip has it whole), not a reason to scroll.
        header.setMaximumSectionSize(260)
        view.selectionModel().currentRowChanged.connect(self._current_changed)
        view.activated.connect(lambda index: self.open_report())
        return view

    def _action(self, text: str, keys: str | QKeySequence, slot: object) -> QAction:
        action = QAction(text, self)
        action.setShortcut(QKeySequence(keys))
        action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        action.triggered.connect(slot)
        self.addAction(action)
        return action

    def _build_buttons(self) -> QHBoxLayout:
        self.report_action = self._action("Open &report", "Ctrl+R", self.open_report)
        self.folder_action = self._action("Open &folder", "Ctrl+Shift+F", self.open_folder)
        self.rescore_action = self._action("Re-&score", "Ctrl+Shift+S", self.ask_rescore)
        self.score_now_action = self._action("Score &now", SCORE_NOW_KEYS, self.score_now)
        self.pane.score_now.clicked.connect(self.score_now_action.trigger)
        self.pane.score_now.setToolTip(
            f"Score this case now with the slides it has ({SCORE_NOW_KEYS})"
        )
        self.pause_action = self._action("&Pause watching", "Ctrl+P", self.toggle_pause)
        self.about_action = self._action(
            "&About", QKeySequence.StandardKey.HelpContents, self.about
        )
        self._action("Queue", "Ctrl+1", lambda: self.queue.setFocus())
        self._action("Result", "Ctrl+2", lambda: self.pane.tabs.setFocus())
        self.sign_off_actions = {
            decision: self._action(verb, keys, lambda _=False, d=decision: self.ask_sign_off(d))
            for decision, verb, _, keys in DECISIONS
        }
        self.next_action = self._action(
            "&Next to review", "Ctrl+N", lambda: self.select_next_to_review()
        )
        self.review_filter = QCheckBox("Only cases &waiting for review")
        self.review_filter.setToolTip("Show only the cases that still need a person (Ctrl+T)")
        self.review_filter.toggled.connect(self._apply_filter)
        self.filter_action = self._action("Waiting for review", "Ctrl+T", self.review_filter.toggle)
        row = QHBoxLayout()
        self.buttons: dict[str, QPushButton] = {}
        for name, action in (
            ("report", self.report_action),
            ("folder", self.folder_action),
            ("rescore", self.rescore_action),
            ("pause", self.pause_action),
            ("about", self.about_action),
        ):
            button = QPushButton(action.text())
            button.clicked.connect(action.trigger)
            button.setToolTip(f"{action.text().replace('&', '')} ({action.shortcut().toString()})")
            self.buttons[name] = button
            row.addWidget(button)
        self.buttons["pause"].setVisible(self.service is not None)
        return row

    def _set_tab_order(self) -> None:
        chain = [
            self.review_filter,
            self.queue,
            *self.buttons.values(),
            self.pane.score_now,
            *self.pane.review_bar.buttons.values(),
            self.pane.tabs,
        ]
        for first, second in itertools.pairwise(chain):
            self.setTabOrder(first, second)

    def _arrange(self, side_by_side: bool, height: int = 0) -> None:
        """The queue beside the result, or above it on a narrow screen."""
        orientation = Qt.Orientation.Horizontal if side_by_side else Qt.Orientation.Vertical
        queue = self.splitter.widget(0).layout()
        if side_by_side:
            queue.setContentsMargins(6, 6, 0, 6)
            sizes = [660, 620]  # at 1280 px: every queue column whole, dates included
        else:
            queue.setContentsMargins(6, 6, 6, 0)
            # The result gets the larger share: at 728 px, its calls show unscrolled.
            sizes = [height * 38 // 100, height * 62 // 100]
        self.splitter.setOrientation(orientation)
        self.splitter.setSizes(sizes)

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802
        side_by_side = event.size().width() >= SIDE_BY_SIDE_PX
        if side_by_side != (self.splitter.orientation() == Qt.Orientation.Horizontal):
            self._arrange(side_by_side, event.size().height() - self.statusBar().height())
        super().resizeEvent(event)

    # --- running ----------------------------------------------------------------
    def start(self) -> None:
        """Start watching the store (call once the window is shown)."""
        self.polling.start()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        self.polling.stop()
        self.pane.loader.cancel()
        QThreadPool.globalInstance().waitForDone(5000)
        super().closeEvent(event)

    def apply_snapshot(self, snapshot: QueueSnapshot) -> None:
        self.service_info = snapshot.service
        self.model.apply(snapshot.cases)
        self.status_label.setText(service_text(snapshot.service, paused=self.pause_reason))
        self._apply_filter()
        self._refresh_pane()
        self._update_buttons()

    def _apply_filter(self, *_: object) -> None:
        """Hide the cases that need no person when the filter is on; count those that do."""
        waiting = [c for c in self.model.cases() if c.review is not None and c.review.to_review]
        self.review_filter.setText(f"Only cases &waiting for review ({len(waiting)})")
        only = self.review_filter.isChecked()
        for row, case in enumerate(self.model.cases()):
            hidden = only and not (case.review is not None and case.review.to_review)
            self.queue.setRowHidden(row, QModelIndex(), hidden)
        current = self.selected_case()
        if only and not (current is not None and current.review and current.review.to_review):
            self.select_next_to_review(from_top=True)

    def select_next_to_review(self, from_top: bool = False) -> bool:
        """Select the next case that waits for a person after the current one (wrapping),
        or the first one in the queue."""
        cases = self.model.cases()
        current = None if from_top else self.selected_case()
        start = next((i for i, c in enumerate(cases) if current and c.id == current.id), -1)
        for step in range(1, len(cases) + 1):
            case = cases[(start + step) % len(cases)]
            if case.review is not None and case.review.to_review:
                self.queue.setCurrentIndex(self.model.case_index(case.id))
                return True
        self.statusBar().showMessage("No case waits for review.", 5000)
        return False

    def _paused(self, reason: str) -> None:
        self.pause_reason = reason
        self.status_label.setText(service_text(self.service_info, paused=reason))

    def _store_problem(self, reason: str) -> None:
        if reason:
            self.status_label.setText(reason)

    def selected_case(self) -> CaseRow | None:
        return self.model.case_at(self.queue.currentIndex())

    def select_case(self, case_key: str) -> None:
        for case in self.model.cases():
            if case.case_key == case_key:
                self.queue.setCurrentIndex(self.model.case_index(case.id))
                return
        raise KeyError(case_key)

    def _current_changed(self, current: QModelIndex, previous: QModelIndex) -> None:
        self._shown_case = None
        self._refresh_pane()
        slide = self.model.slide_at(current)
        if slide is not None:
            self.pane.select_slide(slide.name)
        self._update_buttons()

    def _refresh_pane(self) -> None:
        """Show the selected case; reload only when what the pane shows has changed."""
        case = self.selected_case()
        if case is None:
            self._shown_case = None
            self.pane.show_message("No case selected", "Choose a case in the queue.")
            return
        self.pane.review_bar.show_state(case.review)
        before = self._shown_case
        if before is not None and _pane_key(before) == _pane_key(case):
            return
        self._shown_case = case
        state, stage, progress = case.shown
        if state == "rejected" and not case.result_dir:
            # Refused before any result was written (the reader's reason, in words).
            self.pane.show_message(
                f"{case.case_key}: rejected", case.reason or "no reason recorded"
            )
        elif state in SHOWS_RESULT:
            self.pane.load(case_result_folder(case, self.outbox), case.case_key)
        elif state == "running":
            self.pane.show_message(
                f"{case.case_key}: running",
                f"Stage: {stage or 'starting'} ({round(progress * 100)} %). "
                "The result appears here when the case is done."
                + (f" {self._collecting_text(case)}" if case.state == "waiting" else ""),
                score_now=case.collecting,
            )
        elif state == "failed":
            attempts = f" after {case.attempts} attempts" if case.attempts > 1 else ""
            self.pane.show_message(
                f"{case.case_key}: failed{attempts}",
                f"{case.reason or 'no reason recorded'}\n\nRe-score it once the cause is fixed.",
            )
        elif state == "queued":
            self.pane.show_message(
                f"{case.case_key}: queued",
                "Waiting for its turn."
                + (f" {self._collecting_text(case)}" if case.state == "waiting" else ""),
                score_now=case.collecting,
            )
        else:
            self.pane.show_message(
                f"{case.case_key}: waiting", self._collecting_text(case), score_now=case.collecting
            )

    def _collecting_text(self, case: CaseRow) -> str:
        text = collecting_text(case, self.case_quiet_seconds)
        if not case.collecting:
            return text
        keys = QKeySequence(SCORE_NOW_KEYS).toString(QKeySequence.SequenceFormat.NativeText)
        return f"{text} Score now ({keys}) scores it with the slides it has."

    def _update_buttons(self) -> None:
        case = self.selected_case()
        has_result = case is not None and case.shown[0] in SHOWS_RESULT and bool(case.result_dir)
        self.report_action.setEnabled(has_result)
        self.folder_action.setEnabled(has_result)
        self.rescore_action.setEnabled(case is not None and case.shown[0] not in ("running",))
        self.score_now_action.setEnabled(case is not None and case.collecting)
        self.pane.score_now.setEnabled(self.score_now_action.isEnabled())
        for action in self.sign_off_actions.values():
            action.setEnabled(case is not None and case.review is not None)
        self.pause_action.setEnabled(self.service is not None)
        if self.service is not None:
            self.pause_action.setText(
                "Resume &watching" if self.service.paused else "&Pause watching"
            )
        for name, action in (
            ("report", self.report_action),
            ("folder", self.folder_action),
            ("rescore", self.rescore_action),
            ("pause", self.pause_action),
        ):
            self.buttons[name].setEnabled(action.isEnabled())
            self.buttons[name].setText(action.text())

    # --- actions ------------------------------------------------------------------
    def open_report(self) -> bool:
        loaded = self.pane.loaded
        report = loaded.view.report if loaded is not None else None
        if report is None:
            self.statusBar().showMessage("This case has no report yet.", 5000)
            return False
        return QDesktopServices.openUrl(QUrl.fromLocalFile(str(report)))

    def open_folder(self) -> bool:
        """The shown result's version folder, else the case's folder."""
        loaded = self.pane.loaded
        case = self.selected_case()
        if loaded is not None:
            folder = loaded.view.folder
        elif case is not None:
            folder = case_result_folder(case, self.outbox)
        else:
            return False
        return QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def ask_rescore(self) -> None:
        case = self.selected_case()
        if case is None:
            return
        answer = QMessageBox.question(
            self,
            "Re-score",
            f"Score case {case.case_key} again from its scans?\n"
            "The current result stays readable; the new one gets the next version.",
        )
        if answer == QMessageBox.StandardButton.Yes:
            self.request_rescore(case)

    def request_rescore(self, case: CaseRow) -> None:
        """Flag the case in the store, as `cytoedge rescore` does, off the UI thread."""
        store_path, relay = self.store_path, self.relay

        def flag() -> None:
            try:
                store = JobStore(store_path, timeout=5.0)
                try:
                    store.request_rescore_case(case.id, time.time())
                finally:
                    store.close()
            except (StoreError, OSError) as exc:
                relay.done.emit(False, f"Could not ask for a re-score of {case.case_key}: {exc}")
                return
            relay.done.emit(True, f"{case.case_key} will be scored again.")

        self.statusBar().showMessage(f"Asking the service to re-score {case.case_key}...")
        QThreadPool.globalInstance().start(flag)

    def score_now(self) -> None:
        """Score the selected case without waiting for more slides: the store's flag that
        its `.ready` file sets, written off the UI thread as a re-score is."""
        case = self.selected_case()
        if case is None or not self.score_now_action.isEnabled():
            return
        store_path, relay = self.store_path, self.relay

        def flag() -> None:
            try:
                store = JobStore(store_path, timeout=5.0)
                try:
                    waiting = store.request_score_now(case.id, time.time())
                finally:
                    store.close()
            except (StoreError, OSError) as exc:
                relay.done.emit(False, f"Could not ask to score {case.case_key} now: {exc}")
                return
            if waiting:
                relay.done.emit(True, f"{case.case_key} will be scored with the slides it has.")
            else:
                relay.done.emit(True, f"{case.case_key} is no longer waiting for slides.")

        self.score_now_action.setEnabled(False)  # once is enough: the store says the rest
        self.pane.score_now.setEnabled(False)
        self.statusBar().showMessage(f"Asking the service to score {case.case_key} now...")
        QThreadPool.globalInstance().start(flag)

    def _background_done(self, ok: bool, message: str) -> None:
        self.statusBar().showMessage(message, 10000)
        if not ok:
            box = QMessageBox(QMessageBox.Icon.Warning, "cytoedge", message, parent=self)
            box.setObjectName("rescore_problem")
            box.open()  # not exec(): the queue keeps updating behind it

    def ask_sign_off(self, decision: str) -> SignOffDialog | None:
        """Open the sign-off of the selected case's latest result; signed when confirmed."""
        case = self.selected_case()
        state = case.review if case is not None else None
        if case is None or state is None:
            self.statusBar().showMessage("Select a case with a result to sign it off.", 5000)
            return None
        dialog = SignOffDialog(
            decision,
            case.case_key,
            state,
            self.reviewer or login_name(),
            name_confirmed=bool(self.reviewer),
            parent=self,
        )
        dialog.accepted.connect(lambda: self.sign(case.case_key, state.folder, dialog.sign_off()))
        dialog.finished.connect(dialog.deleteLater)
        dialog.finished.connect(self.activateWindow)  # the keyboard goes back to the queue
        dialog.open()  # window-modal, not exec(): the queue keeps updating behind it
        return dialog

    def sign(self, case_key: str, folder: Path, decision: SignOff) -> None:
        """Write the sign-off (a new version, the audit line, FHIR) off the UI thread."""
        self.reviewer = decision.reviewer
        relay, data_dir, fhir_outbox = self.relay, self.data_dir, self.fhir_outbox
        audit_path, version, max_bytes = self.audit_path, self.version, self.audit_max_bytes

        def write() -> None:
            try:
                audit = AuditLog(
                    audit_path, max_bytes=max_bytes, software_version=version, source="window"
                )
                done = sign_off(
                    folder,
                    decision,
                    data_dir=data_dir,
                    audit=audit,
                    fhir_outbox=fhir_outbox,
                    case_id=case_key,
                )
            except (ReviewError, OSError) as exc:  # OSError: the audit trail's folder
                relay.signed.emit(False, f"Could not sign off {case_key}: {exc}", "", "")
                return
            words = DECISION_WORDS[decision.decision]
            words = words[0].lower() + words[1:]
            relay.signed.emit(
                True,
                f"{case_key} {words} by {decision.reviewer} (version {done.result.version}).",
                str(done.folder.path),
                case_key,
            )

        self.statusBar().showMessage(f"Signing off {case_key}...")
        QThreadPool.globalInstance().start(write)

    def _signed(self, ok: bool, message: str, folder: str, case_key: str) -> None:
        self.statusBar().showMessage(message, 10000)
        if not ok:
            box = QMessageBox(QMessageBox.Icon.Warning, "cytoedge", message, parent=self)
            box.setObjectName("sign_off_problem")
            box.open()
            return
        self._shown_case = None
        self.pane.load(Path(folder), case_key)
        # The audit line is written: the queue's review column catches up now.
        QMetaObject.invokeMethod(
            self.polling.poller, "poll_now", Qt.ConnectionType.QueuedConnection
        )

    def ask_relabel(self, cell: CellView) -> RelabelDialog | None:
        """Ask for a cell's class (from the shown result's cell head); saved when chosen."""
        loaded = self.pane.loaded
        found = loaded.view.result.differential if loaded is not None else None
        if loaded is None or found is None:
            return None
        dialog = RelabelDialog(
            cell, loaded.image(cell.image), found.classes, self.training_dir, parent=self
        )
        folder = loaded.view.folder
        dialog.accepted.connect(lambda: self.relabel(folder, cell, dialog.chosen() or ""))
        dialog.finished.connect(dialog.deleteLater)
        dialog.finished.connect(self.activateWindow)
        dialog.finished.connect(lambda _: self.pane.gallery.cells.setFocus())  # the next cell
        dialog.open()  # window-modal, not exec(): the queue keeps updating behind it
        return dialog

    def relabel(self, folder: Path, cell: CellView, cell_class: str) -> None:
        """Save the cell's new label in the training folder, with an audit line, off the
        UI thread; the result folder is not touched."""
        relay, training_dir = self.relay, self.training_dir
        audit_path, version, max_bytes = self.audit_path, self.version, self.audit_max_bytes
        record = cell.cell
        where = f"cell {record.cell_id} of slide {record.slide}"
        loaded = self.pane.loaded
        label = loaded.view.class_labels.get(cell_class, cell_class) if loaded else cell_class

        def write() -> None:
            try:
                audit = AuditLog(
                    audit_path, max_bytes=max_bytes, software_version=version, source="window"
                )
                saved = save_cell_label(
                    folder,
                    record.slide,
                    record.cell_id,
                    cell_class,
                    training_dir=training_dir,
                    audit=audit,
                    labelled_by=login_name(),
                )
            except RelabelError as exc:
                relay.relabelled.emit(False, f"Could not re-label {where}: {exc}", cell.key, "")
                return
            except OSError as exc:  # the audit trail's folder could not be made
                why = f"the audit trail's folder {audit_path.parent} cannot be written"
                reason = f"{why} ({exc.strerror})" if exc.strerror else why
                relay.relabelled.emit(False, f"Could not re-label {where}: {reason}", cell.key, "")
                return
            relay.relabelled.emit(
                True,
                f"{where[0].upper()}{where[1:]} saved as {label} in {saved.crop.parent}, "
                "a class folder cytoedge train reads.",
                cell.key,
                cell_class,
            )

        self.statusBar().showMessage(f"Saving the label of {where}...")
        QThreadPool.globalInstance().start(write)

    def _relabelled(self, ok: bool, message: str, key: tuple[str, int], cell_class: str) -> None:
        if not ok:
            self.statusBar().showMessage(message, 15000)
            box = QMessageBox(QMessageBox.Icon.Warning, "cytoedge", message, parent=self)
            box.setObjectName("relabel_problem")
            box.open()
            return
        # The whole sentence, folder included, wraps above the gallery; the status bar's
        # line may be narrower than it.
        self.statusBar().showMessage(f"Cell {key[1]} saved for training.", 15000)
        self.pane.gallery.mark_relabelled(key, cell_class, message)

    def toggle_pause(self) -> None:
        if self.service is None:
            return
        self.service.set_paused(not self.service.paused)
        self._update_buttons()

    def about(self) -> None:
        QMessageBox.about(
            self, "About cytoedge", read_about(self.bundle_dir, self.service_info, self.version)
        )
