"""The one worker that drives the accelerator: slide jobs, then case jobs.

The unit of work is the ``Engine`` seam: ``process_slide`` (a slide up to
cached embeddings) and ``score_case`` (the heads over a case, which writes the
versioned result folder atomically). ``appliance.service.engine`` adapts the
real pipeline to it; tests may drive the worker with their own engine.

Crash safety: attempts are counted when a job starts, so a job that keeps
killing the process ends failed instead of looping. Before a case job runs,
the version it will write is stored; if the process dies after the result was
renamed into place, the re-run adopts that folder instead of writing another.

Held work: before each job the worker asks its ``Hold`` (the service's
``appliance.service.pause.WorkHold``) whether work may go on; a damaged bundle
or a full disk is no fault of a scan, so no job starts, and a job that meets one
goes back to the queue with its attempt not counted. When even that write does not
fit on the disk, the job is put back as soon as it does.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.readers.errors import ScanError
from appliance.results import (
    CaseResult,
    ResultError,
    ResultWriteError,
    case_folder,
    existing_versions,
    latest_version,
    point_latest_at,
    read_result,
)
from appliance.service.archive import archive_case
from appliance.service.audit import AuditLog, iso, result_file_hashes
from appliance.service.pause import is_disk_full
from appliance.service.store import (
    DONE,
    FAILED,
    REJECTED,
    BundleIdentity,
    Case,
    JobStore,
    Slide,
)
from runtime.backends import BackendUnavailableError

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]
PROGRESS_WRITE_SECONDS = 0.5
MAX_RETRY_SECONDS = 600.0
IDLE_WAIT_SECONDS = 0.5
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ENOMEM,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EROFS,
        errno.ENFILE,
        errno.EMFILE,
    }
)
# What libraries (ONNX Runtime, CUDA, TensorRT) say when a retry may succeed, and how we say it.
_TRANSIENT_WORDS = {
    "out of memory": "out of memory",
    "failed to allocate": "out of memory",
    "resource exhausted": "out of memory",
    "no space left": "no space left on the disk",
}
# What a failure that is neither the input's fault nor temporary is stored as; the
# log keeps the traceback (internal text is for the site's engineer, not the technician).
INTERNAL_ERROR = "internal error while processing this {job}; the service log has the details"


class JobAbandoned(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised from the progress callback when the service is stopping."""


@dataclass(frozen=True)
class SlideOutcome:
    """What ``process_slide`` produced: ``handle`` is what ``score_case`` needs."""

    handle: object
    n_cells: int
    rejected_reason: str = ""  # QC failed or too few cells: kept, the case result says why
    backend: str = ""  # the backend that actually ran it, when known


@dataclass(frozen=True)
class CaseOutcome:
    status: str  # scored | abstained | rejected (result.json "status")
    reason: str
    version: int
    result_dir: Path
    backend: str = ""
    # The result says no call could be made from this input (QC failed, too few
    # cells): the case is *rejected*, with the result folder saying why.
    no_call: bool = False
    bundle: BundleIdentity | None = None  # the bundle the result names

    @classmethod
    def from_result(cls, result: CaseResult, folder: Path) -> CaseOutcome:
        return cls(
            status=result.status,
            reason=result.abstain_reason or "",
            version=result.version,
            result_dir=folder,
            backend=result.backend,
            no_call=result.status == "abstained" and not result.predictions,
            bundle=BundleIdentity(result.bundle.name, result.bundle.version, result.bundle.sha256),
        )

    @property
    def state(self) -> str:
        """The case's state in the store: rejected when no call could be made."""
        return REJECTED if self.status == "rejected" or self.no_call else DONE


def with_left_out(reason: str, left_out: Sequence[tuple[str, str]]) -> str:
    """A case's reason with the slides it was scored without: (file name, why)."""
    if not left_out:
        return reason
    note = "; ".join(f"{name}: {why}" for name, why in left_out)
    return f"{reason}; left out: {note}" if reason else f"left out: {note}"


class Engine(Protocol):
    """The slide pipeline as the worker sees it."""

    def process_slide(
        self, path: Path, progress: ProgressFn, *, use_cache: bool, fingerprint: str | None = None
    ) -> SlideOutcome:
        """One slide up to cached embeddings; ScanError for an input at fault.

        ``fingerprint``: the content sha256 the watcher computed (None: hash it again)."""
        ...

    def score_case(
        self, case_key: str, slides: Sequence[object], outbox: Path, progress: ProgressFn
    ) -> CaseOutcome:
        """The heads over the slides' handles; writes the next result version atomically."""
        ...

    def space_needed(self, path: Path) -> int:
        """About how many bytes of the data disk ``process_slide(path)`` takes."""
        ...

    def close(self) -> None:
        """Release what is kept between jobs; called on the worker thread as it ends
        (or when it switches to another engine)."""
        ...


# Called by the worker between jobs, on its thread, with a progress function that
# keeps the watchdog fed (and raises JobAbandoned when the service stops): an engine
# to run the next jobs with (another bundle), or None to keep the current one.
EngineRefresh = Callable[[ProgressFn], "Engine | None"]


class Hold(Protocol):
    """Whether work may go on: "" when it may, else why not (one line)."""

    def reason(self, job: Slide | Case | None) -> str:
        """Before a job (None: before choosing one)."""
        ...

    def failed(self, job: Slide | Case | None, exc: BaseException) -> str:
        """After ``job`` failed with ``exc``: why that is no fault of the job."""
        ...


@dataclass(frozen=True)
class WorkerSettings:
    outbox: Path
    case_quiet_seconds: float
    max_attempts: int
    retry_seconds: float
    inbox: Path | None = None
    archive: Path | None = None  # set: a finished case's inputs move there
    case_pattern: re.Pattern[str] | None = None


def classify(exc: BaseException) -> str:
    """rejected (the input is at fault), transient (retry later) or permanent."""
    if isinstance(exc, ScanError):
        return "rejected"
    return "transient" if _transient_text(exc) is not None else "permanent"


def _transient_text(exc: BaseException) -> str | None:
    """A sentence for an error a later try may not meet again (transient); None otherwise."""
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return f"temporary system problem: {os.strerror(exc.errno)}"
    if isinstance(exc, MemoryError):
        return "temporary system problem: out of memory"
    if isinstance(exc, ResultWriteError):
        return "temporary problem: the result folder could not be written"
    if isinstance(exc, TimeoutError):
        return "temporary problem: an operation timed out"
    if isinstance(exc, BackendUnavailableError):
        return "temporary problem: the inference server could not be reached"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        from_cause = _transient_text(cause)
        if from_cause is not None:
            return from_cause
    text = str(exc).lower()
    what = next((said for word, said in _TRANSIENT_WORDS.items() if word in text), None)
    return None if what is None else f"temporary system problem: {what}"


def _name(job: Slide | Case) -> str:
    return job.path if isinstance(job, Slide) else job.case_key


def error_text(exc: BaseException, job: str = "scan") -> str:
    """What is stored and shown for a failed ``job`` (scan | case): the input's reason,
    a temporary problem in words, or that an internal error happened."""
    if isinstance(exc, ScanError):
        return exc.reason
    return _transient_text(exc) or INTERNAL_ERROR.format(job=job)


def retry_delay(attempts: int, base: float) -> float:
    return min(MAX_RETRY_SECONDS, base * 2 ** max(0, attempts - 1))


class Worker:
    """One job at a time; ``stop`` ends it after the current job, ``abandon`` cuts it short."""

    def __init__(
        self,
        engine: Engine,
        store_path: Path,
        settings: WorkerSettings,
        audit: AuditLog,
        *,
        stop: threading.Event,
        abandon: threading.Event,
        wake: threading.Event,
        refresh: EngineRefresh | None = None,
        hold: Hold | None = None,
    ) -> None:
        self.engine = engine
        self.refresh = refresh
        self.hold = hold
        self.store_path = store_path
        self.settings = settings
        self.audit = audit
        self.stop = stop
        self.abandon = abandon
        self.wake = wake
        self.heartbeat = time.monotonic()  # the service's watchdog reads this
        self.current: str = ""
        # Slide handles kept until their case is scored; after a restart the
        # pipeline's embedding cache makes process_slide cheap instead.
        self._handles: dict[int, object] = {}
        self._store: JobStore | None = None
        # Jobs to put back in the queue once the store can be written again.
        self._put_back_later: list[Slide | Case] = []

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.store_path)
        return self._store

    def run(self) -> None:
        """The thread body."""
        try:
            while not self.stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    worked = self.run_one()
                except Exception as exc:
                    if not self._held_by(None, exc):
                        log.exception("worker loop error; continuing")
                    worked = False
                if not worked:
                    self.wake.wait(IDLE_WAIT_SECONDS)
                    self.wake.clear()
        finally:
            try:
                # Sessions made on this thread are released on it, not at interpreter exit.
                self.engine.close()
            finally:
                if self._store is not None:
                    self._store.close()
                    self._store = None

    def run_one(self) -> bool:
        """Run the next job, if any: ready cases first (cheap, a result), then slides."""
        self._switch_engine()
        if self._held(None):
            return False
        while self._put_back_later:
            self._put_back(self._put_back_later[0])
            self._put_back_later.pop(0)
        now = time.time()
        for case in self.store.promote_ready_cases(self.settings.case_quiet_seconds, now):
            log.info("case complete, queued for scoring", extra={"case": case.case_key})
        case = self.store.next_case_job(now)
        if case is not None:
            if self._held(case):
                return False
            self.run_case(case)
            return True
        slide = self.store.next_slide_job(now)
        if slide is not None:
            if self._held(slide):
                return False
            self.run_slide(slide)
            return True
        return False

    # --- held work ----------------------------------------------------------------

    def _held(self, job: Slide | Case | None) -> bool:
        return bool(self.hold and self.hold.reason(job))

    def _held_by(self, job: Slide | Case | None, exc: BaseException) -> bool:
        """``exc`` is no fault of ``job`` (a damaged bundle, a full disk): the job, if
        any, goes back to the queue, its attempt not counted."""
        why = self.hold.failed(job, exc) if self.hold else ""
        if not why:
            return False
        if job is not None:
            log.warning("job put back in the queue", extra={"job": _name(job), "reason": why})
            try:
                self._put_back(job)
            except Exception as again:
                if not is_disk_full(again):
                    raise
                self._put_back_later.append(job)
        return True

    def case_cells(self, case: Case) -> int:
        """The cells a case's slides gave (what its result version will show)."""
        return sum(s.n_cells or 0 for s in self.store.slides(case.id))

    def _put_back(self, job: Slide | Case) -> None:
        if isinstance(job, Slide):
            self.store.abandon_slide(job.id)
        else:
            self.store.abandon_case(job.id, time.time())

    def _switch_engine(self) -> None:
        """Between jobs only: a job runs start to end on the engine it started with."""
        if self.refresh is None:
            return
        try:
            engine = self.refresh(self._progress(lambda stage, fraction: None))
        except JobAbandoned:
            return
        if engine is None:
            return
        previous, self.engine = self.engine, engine
        # Slides embedded by the previous bundle are embedded again by the new one
        # (its cache entries are keyed by the bundle), never mixed into one case.
        self._handles.clear()
        previous.close()

    # --- progress -------------------------------------------------------------

    def _progress(self, write: Callable[[str, float], None]) -> ProgressFn:
        last = {"stage": "", "at": 0.0}

        def report(stage: str, fraction: float) -> None:
            self.heartbeat = time.monotonic()
            if self.abandon.is_set():
                raise JobAbandoned("the service is stopping")
            if stage != last["stage"] or self.heartbeat - last["at"] >= PROGRESS_WRITE_SECONDS:
                last["stage"], last["at"] = stage, self.heartbeat
                write(stage, fraction)

        return report

    # --- slides -----------------------------------------------------------------

    def run_slide(self, queued: Slide) -> None:
        slide = self.store.start_slide(queued.id, time.time())
        self.current = slide.path
        log.info("slide started", extra={"path": slide.path, "attempt": slide.attempts})
        progress = self._progress(lambda s, f: self.store.slide_progress(slide.id, s, f))
        try:
            outcome = self.engine.process_slide(
                Path(slide.path),
                progress,
                use_cache=not slide.rescore,
                fingerprint=slide.fingerprint,
            )
        except JobAbandoned:
            self.store.abandon_slide(slide.id)
            log.info("slide abandoned: the service is stopping", extra={"path": slide.path})
            return
        except Exception as exc:
            if not self._held_by(slide, exc):
                self._slide_error(slide, exc)
            return
        finally:
            self.current = ""
        self._handles[slide.id] = outcome.handle
        state = REJECTED if outcome.rejected_reason else DONE
        now = time.time()
        try:
            self.store.finish_slide(
                slide.id, state, reason=outcome.rejected_reason, n_cells=outcome.n_cells, now=now
            )
        except Exception as exc:  # the run again reads the slide's cache entry
            if not self._held_by(slide, exc):
                raise
            return
        self._audit_slide(
            slide, state, outcome.rejected_reason, now, n_cells=outcome.n_cells,
            backend=outcome.backend,
        )  # fmt: skip
        log.info("slide finished", extra={"path": slide.path, "state": state})

    def _slide_error(self, slide: Slide, exc: Exception) -> None:
        kind = classify(exc)
        text = error_text(exc)
        now = time.time()
        if kind == "rejected":
            self.store.finish_slide(slide.id, REJECTED, reason=text, n_cells=None, now=now)
            self._audit_slide(slide, REJECTED, text, now)
            log.warning("slide rejected", extra={"path": slide.path, "reason": text})
        elif kind == "transient" and slide.attempts < self.settings.max_attempts:
            at = now + retry_delay(slide.attempts, self.settings.retry_seconds)
            self.store.retry_slide(slide.id, text, at)
            self.audit.record(
                "retry", kind="slide", slide_id=slide.id, path=slide.path, error=text,
                attempt=slide.attempts, next_attempt_at=iso(at),
            )  # fmt: skip
            log.warning(
                "slide failed, will retry",
                exc_info=exc,
                extra={"path": slide.path, "error": text},
            )
        else:
            if kind == "transient":
                text = f"{text} (gave up after {slide.attempts} attempts)"
            log.error("slide failed", exc_info=exc, extra={"path": slide.path, "error": text})
            self.store.fail_slide(slide.id, text, now)
            self._audit_slide(slide, FAILED, text, now)

    def _audit_slide(
        self,
        slide: Slide,
        outcome: str,
        reason: str,
        now: float,
        n_cells: int | None = None,
        backend: str = "",
    ) -> None:
        self.audit.record(
            "finished",
            kind="slide",
            slide_id=slide.id,
            case_id=slide.case_id,
            path=slide.path,
            size=slide.size,
            fingerprint=slide.fingerprint,
            seen_at=iso(slide.seen_at),
            started_at=iso(slide.started_at),
            finished_at=iso(now),
            attempts=slide.attempts,
            n_cells=n_cells,
            outcome=outcome,
            reason=reason,
            **({"backend": backend} if backend else {}),
        )

    # --- cases ------------------------------------------------------------------

    def run_case(self, queued: Case) -> None:
        slides = self.store.slides(queued.id)
        members = [s for s in slides if s.duplicate_of is None and s.n_cells is not None]
        if not members:
            self._finish_without_scoring(queued, slides)
            return
        case_dir = case_folder(self.settings.outbox, queued.case_key)
        adopted = self._adopt_written_result(queued, case_dir)
        if adopted is not None:
            self._finish_case(queued, adopted, slides)
            return
        version = (existing_versions(case_dir) or [0])[-1] + 1
        case = self.store.start_case(queued.id, version, time.time())
        self.current = case.case_key
        log.info("case scoring started", extra={"case": case.case_key, "slides": len(members)})
        progress = self._progress(lambda s, f: self.store.case_progress(case.id, s, f, time.time()))
        try:
            handles = [self._handle(s, progress) for s in members]
            outcome = self.engine.score_case(case.case_key, handles, self.settings.outbox, progress)
        except JobAbandoned:
            self.store.abandon_case(case.id, time.time())
            log.info("case abandoned: the service is stopping", extra={"case": case.case_key})
            return
        except Exception as exc:
            if not self._held_by(case, exc):
                self._case_error(case, exc)
            return
        finally:
            self.current = ""
        try:
            self._finish_case(case, outcome, slides)
        except Exception as exc:  # the run again adopts the result written
            if not self._held_by(case, exc):
                raise

    def _handle(self, slide: Slide, progress: ProgressFn) -> object:
        handle = self._handles.get(slide.id)
        if handle is None:  # after a restart: the pipeline's cache answers
            handle = self.engine.process_slide(
                Path(slide.path), progress, use_cache=True, fingerprint=slide.fingerprint
            ).handle
        return handle

    def _adopt_written_result(self, case: Case, case_dir: Path) -> CaseOutcome | None:
        """The previous run of this job died after its result was renamed into place."""
        if case.pending_version is None:
            return None
        folder = case_dir / f"v{case.pending_version}"
        try:
            result = read_result(folder)
        except ResultError:
            return None
        if result.review is not None or result.case_id != case.case_key:
            return None  # a sign-off (or another case) took that number: this job wrote nothing
        latest = latest_version(self.settings.outbox, case.case_key)
        if latest is None or latest.version < case.pending_version:
            point_latest_at(case_dir, case.pending_version)
        log.info(
            "result of an interrupted job found and kept",
            extra={"case": case.case_key, "version": case.pending_version},
        )
        return CaseOutcome.from_result(result, folder)

    def _finish_case(self, case: Case, outcome: CaseOutcome, slides: list[Slide]) -> None:
        state = outcome.state
        failed = [
            s for s in slides if s.state == FAILED or (s.state == REJECTED and s.n_cells is None)
        ]
        reason = with_left_out(
            outcome.reason, [(Path(s.path).name, s.reason or s.last_error) for s in failed]
        )
        now = time.time()
        self.store.finish_case(
            case.id,
            state,
            reason=reason,
            result_version=outcome.version,
            result_dir=str(outcome.result_dir),
            now=now,
            written_by=outcome.bundle,
            backend=outcome.backend,
        )
        for slide in slides:
            self._handles.pop(slide.id, None)
        self._audit_case(case, slides, state, reason, now, outcome)
        self._archive(case, slides)
        log.info(
            "case finished",
            extra={"case": case.case_key, "state": state, "version": outcome.version},
        )

    def _finish_without_scoring(self, case: Case, slides: list[Slide]) -> None:
        """No slide to score: all copies of scans held elsewhere, or all unusable."""
        now = time.time()
        copies = [s for s in slides if s.duplicate_of is not None]
        result_version, result_dir = None, ""
        if copies and len(copies) == len(slides):
            original = self.store.slide(copies[0].duplicate_of or 0)
            holder = self.store.case(original.case_id)
            state = DONE
            reason = f"same scan as case {holder.case_key}: not scored again"
            result_version, result_dir = holder.result_version, holder.result_dir
        else:
            bad = [s for s in slides if s.duplicate_of is None]
            state = FAILED if any(s.state == FAILED for s in bad) else REJECTED
            reason = "; ".join(f"{Path(s.path).name}: {s.reason or s.last_error}" for s in bad)
        self.store.finish_case(
            case.id,
            state,
            reason=reason,
            result_version=result_version,
            result_dir=result_dir,
            now=now,
        )
        self._audit_case(case, slides, state, reason, now, None)
        if state != FAILED:
            self._archive(case, slides)

    def _archive(self, case: Case, slides: list[Slide]) -> None:
        """The configured archive move; a failure to move is logged, never fatal."""
        settings = self.settings
        if settings.archive is None or settings.inbox is None:
            return
        try:
            moved = archive_case(
                [s.path for s in slides], settings.inbox, settings.archive, settings.case_pattern
            )
        except OSError as exc:
            log.error("archive move failed", extra={"case": case.case_key, "error": str(exc)})
            return
        by_path = {s.path: s for s in slides}
        for old, new in moved.items():
            self.store.move_slide(by_path[old].id, new)
        if moved:
            self.audit.record("archived", kind="case", case=case.case_key, moved=moved)

    def _case_error(self, case: Case, exc: Exception) -> None:
        kind = classify(exc)
        text = error_text(exc, "case")
        now = time.time()
        if kind == "transient" and case.attempts < self.settings.max_attempts:
            at = now + retry_delay(case.attempts, self.settings.retry_seconds)
            self.store.retry_case(case.id, text, at, now)
            self.audit.record(
                "retry", kind="case", case=case.case_key, error=text,
                attempt=case.attempts, next_attempt_at=iso(at),
            )  # fmt: skip
            log.warning(
                "case failed, will retry",
                exc_info=exc,
                extra={"case": case.case_key, "error": text},
            )
            return
        if kind == "transient":
            text = f"{text} (gave up after {case.attempts} attempts)"
        if kind != "rejected":
            log.error("case failed", exc_info=exc, extra={"case": case.case_key, "error": text})
        state = REJECTED if kind == "rejected" else FAILED
        if state == REJECTED:
            self.store.finish_case(
                case.id, REJECTED, reason=text, result_version=None, result_dir="", now=now
            )
        else:
            self.store.fail_case(case.id, text, now)
        self._audit_case(case, self.store.slides(case.id), state, text, now, None)

    def _audit_case(
        self,
        case: Case,
        slides: list[Slide],
        outcome: str,
        reason: str,
        now: float,
        result: CaseOutcome | None,
    ) -> None:
        self.audit.record(
            "finished",
            kind="case",
            case=case.case_key,
            case_id=case.id,
            slides=[
                {"path": s.path, "size": s.size, "fingerprint": s.fingerprint, "state": s.state}
                for s in slides
            ],
            received_at=iso(case.received_at),
            started_at=iso(case.started_at),
            finished_at=iso(now),
            attempts=case.attempts,
            outcome=outcome,
            status=result.status if result else None,
            version=result.version if result else None,
            result_dir=str(result.result_dir) if result else None,
            # Every file of the version by its hash: `cytoedge audit verify` checks them.
            result_files=result_file_hashes(result.result_dir) if result else None,
            reason=reason,
            **({"backend": result.backend} if result and result.backend else {}),
            # The bundle the result names (it wrote it), over the service's current one.
            **({"bundle": dataclasses.asdict(result.bundle)} if result and result.bundle else {}),
        )
