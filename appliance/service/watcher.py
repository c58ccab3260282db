"""The inbox watcher: finds scans, waits until each is complete, queues it once.

Change events come from watchdog's native observer (inotify), or its polling
observer for network shares where events do not arrive. Events only nudge: the
truth is a scan of the inbox, done at start-up (files that arrived while the
service was down), on every nudge and every ``rescan_seconds``. A unit is
admitted when its signature (files, bytes, newest mtime) has not changed for
``quiet_seconds`` and the reader's probe opens it; then it is fingerprinted,
and a copy of content already held is recorded as such, not queued again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from appliance.readers import ScanError
from appliance.service import inbox_layout
from appliance.service.audit import AuditLog
from appliance.service.audit import iso as _iso
from appliance.service.pause import is_disk_full
from appliance.service.store import TERMINAL, WAITING, JobStore, Slide

log = logging.getLogger(__name__)

ProbeFn = Callable[[Path], object]
TICK_SECONDS = 0.5
# A complete file the reader still cannot open gets this many quiet periods to
# become readable (some writers finish a header last), then it is rejected.
PROBE_PATIENCE = 3
PROBE_INTERNAL_ERROR = "internal error while checking this scan; the service log has the details"


@dataclass(frozen=True)
class WatchSettings:
    inbox: Path
    quiet_seconds: float
    rescan_seconds: float
    polling: bool
    case_pattern: re.Pattern[str] | None
    # The bundle new scans are admitted under, asked at each admission: the service
    # may switch bundles between jobs.
    bundle_hash: Callable[[], str]


class _Nudge(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


class InboxWatcher:
    """Runs in its own thread; talks to the worker only through the store."""

    def __init__(
        self,
        settings: WatchSettings,
        store_path: Path,
        probe: ProbeFn,
        audit: AuditLog,
        on_admitted: Callable[[], None],
        paused: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.store_path = store_path
        self.probe = probe
        self.audit = audit
        self.on_admitted = on_admitted
        self.paused = paused or threading.Event()
        self.tracker = inbox_layout.StabilityTracker()
        self.pending: dict[Path, inbox_layout.Unit] = {}
        self._nudged = threading.Event()
        self._observer: Observer | PollingObserver | None = None
        self._store: JobStore | None = None
        self._last_full_scan = float("-inf")

    # --- lifecycle ------------------------------------------------------------

    def start_observer(self) -> None:
        observer = (
            PollingObserver(timeout=max(1.0, self.settings.quiet_seconds / 2))
            if self.settings.polling
            else Observer()
        )
        observer.schedule(_Nudge(self._nudged), str(self.settings.inbox), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def run(self, stop: threading.Event) -> None:
        """The thread body: until ``stop`` is set."""
        self._store = JobStore(self.store_path)
        try:
            self.forget_vanished()
            self.start_observer()
            while not stop.is_set():
                if self.paused.is_set():
                    stop.wait(TICK_SECONDS)
                    continue
                try:
                    self.tick(time.monotonic())
                except Exception as exc:  # one bad look at the inbox must not end the watching
                    if not is_disk_full(exc):
                        log.exception("inbox scan failed; trying again")
                    # Full: nothing admitted is lost; the worker's hold says so once.
                self._nudged.wait(TICK_SECONDS)
        finally:
            self.stop_observer()
            self._store.close()
            self._store = None

    def forget_vanished(self) -> None:
        """Scans that were being written when the service stopped and are gone now."""
        for slide in self.store.slides():
            if slide.state == WAITING and not Path(slide.path).exists():
                self.store.forget_slide(slide.id)
                log.info("a scan seen before the restart is gone", extra={"path": slide.path})

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.store_path)
        return self._store

    # --- one look ---------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Rescan when nudged or due, then check every unit not yet complete."""
        if self._nudged.is_set() or now - self._last_full_scan >= self.settings.rescan_seconds:
            self._nudged.clear()
            self._last_full_scan = now
            self.scan_inbox()
        for path, unit in list(self.pending.items()):
            self._check(unit, now)
            if path not in self.pending:
                self.tracker.forget(path)

    def scan_inbox(self) -> None:
        found = inbox_layout.discover(self.settings.inbox, self.settings.case_pattern)
        wall = time.time()
        current = {unit.path for unit in found.units}
        for path in [p for p in self.pending if p not in current]:
            # Gone, or no longer a unit of its own (a folder now seen whole).
            del self.pending[path]
            self.tracker.forget(path)
            row = self.store.slide_by_path(str(path))
            if row is not None and row.state == WAITING:
                self.store.forget_slide(row.id)
                log.info("a waiting scan is gone or changed shape", extra={"path": str(path)})
        for unit in found.units:
            if unit.path in self.pending:
                continue
            row = self.store.slide_by_path(str(unit.path))
            if row is not None and row.state != WAITING:
                sig = inbox_layout.signature(unit)
                if sig is None or (sig.size == row.size and abs(sig.mtime - row.mtime) < 1e-6):
                    continue  # known and unchanged
                log.info("a known scan changed; checking it again", extra={"path": str(unit.path)})
            elif row is None:
                sig = inbox_layout.signature(unit)
                if sig is None:
                    continue
                self.store.add_waiting_slide(
                    unit.case_key,
                    str(unit.path),
                    sig.size,
                    sig.mtime,
                    single=unit.single,
                    now=wall,
                )
                log.info("new scan seen", extra={"path": str(unit.path), "case": unit.case_key})
            self.pending[unit.path] = unit
        for case_key in found.ready_cases:
            case = self.store.case_by_key(case_key)
            if case is not None and not case.ready:
                self.store.set_case_ready(case.id, True, wall)
                self.on_admitted()

    def _check(self, unit: inbox_layout.Unit, now: float) -> None:
        wall = time.time()
        row = self.store.slide_by_path(str(unit.path))
        sig = inbox_layout.signature(unit)
        if sig is None or row is None:
            # Gone before it was complete (renamed away, deleted): forget the waiting row.
            if row is not None and row.state == WAITING:
                self.store.forget_slide(row.id)
                log.info("scan vanished while being written", extra={"path": str(unit.path)})
            del self.pending[unit.path]
            return
        quiet_for = self.tracker.observe(unit.path, sig, now)
        if row.state == WAITING and (sig.size != row.size or sig.mtime != row.mtime):
            self.store.update_waiting(row.id, sig.size, sig.mtime, wall)
        if quiet_for < self.settings.quiet_seconds:
            return
        if unit.kind.is_folder_of_images and not inbox_layout.folder_complete(unit.path):
            return  # a folder of cells or fields is complete only once it says so
        if not unit.supported:
            self._reject(row, unit, sig, unit.unsupported_reason)
            return
        try:
            self.probe(unit.path)
        except Exception as exc:
            if quiet_for < PROBE_PATIENCE * self.settings.quiet_seconds:
                return
            self._reject(row, unit, sig, _reason(exc, unit.path))
            return
        digest = unit.members.fingerprint()
        if inbox_layout.signature(unit) != sig:
            return  # written to while hashing: not complete after all
        self._admit(row, unit, sig, digest, wall)

    def _admit(
        self,
        row: Slide,
        unit: inbox_layout.Unit,
        sig: inbox_layout.Signature,
        digest: str,
        wall: float,
    ) -> None:
        del self.pending[unit.path]
        if row.state in TERMINAL and row.fingerprint == digest:
            # Touched or copied over with the same bytes: nothing new to score.
            self.store.touch_slide(row.id, sig.size, sig.mtime)
            return
        slide = self.store.admit_slide(
            row.id,
            fingerprint=digest,
            bundle_hash=self.settings.bundle_hash(),
            size=sig.size,
            mtime=sig.mtime,
            now=wall,
        )
        event = "duplicate" if slide.duplicate_of else "received"
        self.audit.record(
            event,
            kind="slide",
            slide_id=slide.id,
            case=unit.case_key,
            path=str(unit.path),
            size=sig.size,
            files=sig.files,
            fingerprint=digest,
            seen_at=_iso(slide.seen_at),
            reason=slide.reason,
        )
        log.info(
            "scan complete" if not slide.duplicate_of else "same scan as one already held",
            extra={"path": str(unit.path), "case": unit.case_key, "fingerprint": digest},
        )
        self.on_admitted()

    def _reject(
        self, row: Slide, unit: inbox_layout.Unit, sig: inbox_layout.Signature, reason: str
    ) -> None:
        del self.pending[unit.path]
        wall = time.time()
        self.store.reject_slide(row.id, reason, wall, size=sig.size, mtime=sig.mtime)
        self.audit.record(
            "finished",
            kind="slide",
            slide_id=row.id,
            case=unit.case_key,
            path=str(unit.path),
            size=sig.size,
            fingerprint=None,
            seen_at=_iso(row.seen_at),
            started_at=None,
            finished_at=_iso(wall),
            outcome="rejected",
            reason=reason,
        )
        log.warning("scan rejected", extra={"path": str(unit.path), "reason": reason})
        self.on_admitted()  # its case may now be complete


def _reason(exc: BaseException, path: Path) -> str:
    """The stored reason for a probe failure: the reader's sentence, never internal text."""
    if isinstance(exc, ScanError):
        return exc.reason
    log.error("probe failed unexpectedly", exc_info=exc, extra={"path": str(path)})
    return PROBE_INTERNAL_ERROR
