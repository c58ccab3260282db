"""The queue as the window shows it, read through the job store's own read-only API.

The window may run as another user than the service, beside a system service,
so the store is opened read-only (``JobStore(path, readonly=True)``). WAL mode
lets a reader see the last committed state while the worker writes; a short busy
timeout means a poll that collides with a checkpoint is skipped, not waited on.
Nothing here imports Qt or writes SQL: the queue logic is testable without a screen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.service.store import Case, JobStore, ServiceRow, Slide, StoreError, StoreSnapshot

if TYPE_CHECKING:
    from gui.review_state import ReviewState

BUSY_TIMEOUT_S = 0.05


class StoreUnavailableError(RuntimeError):
    """The store cannot be read now (absent, locked, not a job store); one-line reason."""


def when(epoch: float | None) -> datetime | None:
    """A store time (UTC epoch seconds) as an aware datetime, shown in local time later."""
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


@dataclass(frozen=True)
class SlideRow:
    id: int
    case_id: int
    path: str
    state: str
    stage: str
    progress: float
    n_cells: int | None
    reason: str
    seen_at: datetime | None

    @classmethod
    def of(cls, slide: Slide) -> SlideRow:
        return cls(
            id=slide.id,
            case_id=slide.case_id,
            path=slide.path,
            state=slide.state,
            stage=slide.stage,
            progress=slide.progress,
            n_cells=slide.n_cells,
            reason=slide.reason or slide.last_error,
            seen_at=when(slide.seen_at),
        )

    @property
    def name(self) -> str:
        return Path(self.path).name or self.path

    @property
    def shown(self) -> tuple[str, str, float]:
        return self.state, self.stage, self.progress


@dataclass(frozen=True)
class CaseRow:
    id: int
    case_key: str
    state: str
    received_at: datetime | None
    updated_at: datetime | None
    stage: str
    progress: float
    result_version: int | None
    result_dir: str
    reason: str
    attempts: int
    slides: tuple[SlideRow, ...] = ()
    review: ReviewState | None = None  # from its result versions (gui.review_state)
    ready: bool = False  # scored once its slides are processed (`.ready`, Score now)
    single: bool = False  # a loose file: scored once its slide is processed
    last_slide_at: datetime | None = None  # its quiet period runs from here

    @classmethod
    def of(cls, case: Case, slides: tuple[SlideRow, ...]) -> CaseRow:
        return cls(
            id=case.id,
            case_key=case.case_key,
            state=case.state,
            received_at=when(case.received_at),
            updated_at=when(case.updated_at),
            stage=case.stage,
            progress=case.progress,
            result_version=case.result_version,
            result_dir=case.result_dir,
            reason=case.reason,
            attempts=case.attempts,
            slides=slides,
            ready=bool(case.ready),
            single=bool(case.single),
            last_slide_at=when(case.last_slide_at),
        )

    @property
    def collecting(self) -> bool:
        """Still collecting slides: scored only after its quiet period (or when asked)."""
        return self.state == "waiting" and not (self.ready or self.single)

    @property
    def n_cells(self) -> int | None:
        counts = [s.n_cells for s in self.slides if s.n_cells is not None]
        return sum(counts) if counts else None

    @property
    def shown(self) -> tuple[str, str, float]:
        """(state, stage, progress) as the queue shows them.

        The service keeps a case ``waiting`` while it collects slides, even
        while those slides are being processed; the technician sees that work.
        """
        if self.state == "waiting":
            running = [s for s in self.slides if s.state == "running"]
            if running:
                return "running", running[0].stage, running[0].progress
            if any(s.state == "queued" for s in self.slides):
                return "queued", "", 0.0
        return self.state, self.stage, self.progress


@dataclass(frozen=True)
class ServiceInfo:
    """The service's own row: who runs it, with what, and when it last said so."""

    pid: int
    host: str
    started_at: datetime | None
    heartbeat_at: datetime | None
    bundle: str
    backend: str
    software_version: str

    @classmethod
    def of(cls, row: ServiceRow) -> ServiceInfo:
        return cls(
            pid=row.pid,
            host=row.host,
            started_at=when(row.started_at),
            heartbeat_at=when(row.heartbeat_at),
            bundle=row.bundle,
            backend=row.backend,
            software_version=row.software_version,
        )


@dataclass(frozen=True)
class QueueSnapshot:
    cases: list[CaseRow]
    service: ServiceInfo | None


def queue_of(snapshot: StoreSnapshot) -> QueueSnapshot:
    """The store's rows as the queue shows them: most recent case first, each case's
    slides in arrival order."""
    slides: dict[int, list[SlideRow]] = {}
    for slide in snapshot.slides:  # the store gives them in arrival order
        slides.setdefault(slide.case_id, []).append(SlideRow.of(slide))
    cases = [CaseRow.of(c, tuple(slides.get(c.id, ()))) for c in snapshot.cases]
    cases.sort(key=lambda c: (c.received_at or datetime.min.replace(tzinfo=UTC), c.id))
    service = ServiceInfo.of(snapshot.service) if snapshot.service else None
    return QueueSnapshot(cases[::-1], service)


class StoreReader:
    """Polls the store; hands back the queue only when another connection committed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._store: JobStore | None = None
        self._version: int | None = None

    def poll(self) -> QueueSnapshot | None:
        """The queue if it changed since the last poll, else None; raises StoreUnavailableError."""
        try:
            if self._store is None:
                self._store = JobStore(self.path, readonly=True, timeout=BUSY_TIMEOUT_S)
                self._version = None
            version = self._store.data_version()
            if version == self._version:
                return None
            queue = queue_of(self._store.snapshot())
        except StoreError as exc:
            self.close()  # reopen next time: the file may have been replaced
            raise StoreUnavailableError(str(exc)) from None
        self._version = version
        return queue

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self._store = None
        self._version = None
