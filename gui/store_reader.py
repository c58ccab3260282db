"""Read the service's job store without ever writing to it or waiting on it.

The window may run as another user than the service, beside a system service,
so the store is opened read-only through a ``mode=ro`` URI. WAL mode lets a
reader see the last committed state while the worker writes; a short busy
timeout means a poll that collides with a checkpoint is skipped, not waited on.
Nothing here imports Qt: the queue logic is testable without a screen.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

STATES = ("waiting", "queued", "running", "done", "rejected", "failed")
BUSY_TIMEOUT_S = 0.05


class StoreUnavailableError(RuntimeError):
    """The store cannot be read now (absent, locked, not a job store); one-line reason."""


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


@dataclass(frozen=True)
class QueueSnapshot:
    cases: list[CaseRow]
    service: ServiceInfo | None


def to_datetime(value: object) -> datetime | None:
    """Store times as UTC epoch seconds or ISO 8601 text; both are read, shown local."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), tz=UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def to_fraction(value: object) -> float:
    """Progress is a fraction 0..1 in the store; clamp whatever arrives."""
    try:
        return min(1.0, max(0.0, float(value)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open the job store read-only; raises StoreUnavailableError when it is not there yet."""
    if not path.is_file():
        raise StoreUnavailableError(f"no job store at {path} (has the service started?)")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
        conn.execute("SELECT 1 FROM cases LIMIT 1")
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"cannot read the job store {path}: {exc}") from None
    conn.row_factory = sqlite3.Row
    return conn


def _text(value: object) -> str:
    return "" if value is None else str(value)


def read_queue(conn: sqlite3.Connection) -> list[CaseRow]:
    """All cases, most recently received first, each with its slides in arrival order."""
    try:
        # One read transaction, so cases and slides come from the same snapshot.
        conn.execute("BEGIN")
        try:
            case_rows = conn.execute(
                "SELECT id, case_key, state, received_at, updated_at, stage, progress, "
                "result_version, result_dir, reason, attempts FROM cases"
            ).fetchall()
            slide_rows = conn.execute(
                "SELECT id, case_id, path, state, stage, progress, n_cells, reason, "
                "last_error, seen_at FROM slides"
            ).fetchall()
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"cannot read the job store: {exc}") from None

    slides: dict[int, list[SlideRow]] = {}
    for row in slide_rows:
        slide = SlideRow(
            id=int(row["id"]),
            case_id=int(row["case_id"]),
            path=_text(row["path"]),
            state=_text(row["state"]),
            stage=_text(row["stage"]),
            progress=to_fraction(row["progress"]),
            n_cells=None if row["n_cells"] is None else int(row["n_cells"]),
            reason=_text(row["reason"]) or _text(row["last_error"]),
            seen_at=to_datetime(row["seen_at"]),
        )
        slides.setdefault(slide.case_id, []).append(slide)
    oldest = datetime.min.replace(tzinfo=UTC)
    cases = [
        CaseRow(
            id=int(row["id"]),
            case_key=_text(row["case_key"]),
            state=_text(row["state"]),
            received_at=to_datetime(row["received_at"]),
            updated_at=to_datetime(row["updated_at"]),
            stage=_text(row["stage"]),
            progress=to_fraction(row["progress"]),
            result_version=None if row["result_version"] is None else int(row["result_version"]),
            result_dir=_text(row["result_dir"]),
            reason=_text(row["reason"]),
            attempts=int(row["attempts"] or 0),
            slides=tuple(
                sorted(slides.get(int(row["id"]), []), key=lambda s: (s.seen_at or oldest, s.id))
            ),
        )
        for row in case_rows
    ]
    cases.sort(key=lambda c: (c.received_at or oldest, c.id), reverse=True)
    return cases


def read_service(conn: sqlite3.Connection) -> ServiceInfo | None:
    """The service row, or None when no service has registered (or the table is absent)."""
    try:
        row = conn.execute(
            "SELECT pid, host, started_at, heartbeat_at, bundle, backend, software_version "
            "FROM service WHERE id = 1"
        ).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    return ServiceInfo(
        pid=int(row[0] or 0),
        host=_text(row[1]),
        started_at=to_datetime(row[2]),
        heartbeat_at=to_datetime(row[3]),
        bundle=_text(row[4]),
        backend=_text(row[5]),
        software_version=_text(row[6]),
    )


class StoreReader:
    """Polls the store; hands back the queue only when another connection committed.

    ``PRAGMA data_version`` changes on this connection exactly when some other
    connection has committed, so an idle queue costs one pragma per poll.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None

    def poll(self) -> QueueSnapshot | None:
        """The queue if it changed since the last poll, else None; raises StoreUnavailableError."""
        try:
            if self._conn is None:
                self._conn = open_readonly(self.path)
                self._version = None
            version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            if version == self._version:
                return None
            queue = QueueSnapshot(read_queue(self._conn), read_service(self._conn))
        except (StoreUnavailableError, sqlite3.Error) as exc:
            self.close()  # reopen next time: the file may have been replaced
            if isinstance(exc, StoreUnavailableError):
                raise
            raise StoreUnavailableError(f"cannot read the job store: {exc}") from None
        self._version = version
        return queue

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._version = None
