"""The durable job store: cases and slides as rows in SQLite (WAL).

One file, ``<data_dir>/state/jobs.sqlite``. The service is the only writer
(plus ``cytoedge rescore``, which only flags rows); the window and
``cytoedge status`` open it read-only and never wait on the worker because
every write is a short transaction and WAL keeps readers on the last commit.

States (docs/DESIGN.md "Job store"): waiting (being written / case still
collecting slides), queued, running (stage, progress), done, rejected,
failed. Times are UTC epoch seconds. The schema and its migrations are in
``appliance.service.migrations``; a writer brings the store to this release's
schema when it opens it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from appliance.service.migrations import SCHEMA_VERSION, SchemaError, check_readable, migrate

STORE_FILE = "jobs.sqlite"
WAITING, QUEUED, RUNNING, DONE, REJECTED, FAILED = (
    "waiting",
    "queued",
    "running",
    "done",
    "rejected",
    "failed",
)
STATES = (WAITING, QUEUED, RUNNING, DONE, REJECTED, FAILED)
TERMINAL = (DONE, REJECTED, FAILED)


class StoreError(RuntimeError):
    """The job store cannot be opened or used; the message is one line."""


@dataclass(frozen=True)
class BundleIdentity:
    """Which model bundle: what results, the audit trail and the store name it by."""

    name: str
    version: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Slide:
    id: int
    case_id: int
    path: str
    size: int
    mtime: float
    fingerprint: str | None
    state: str
    stage: str
    progress: float
    seen_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    last_error: str
    reason: str
    n_cells: int | None
    bundle_hash: str
    duplicate_of: int | None
    next_attempt_at: float
    rescore: int


@dataclass(frozen=True)
class Case:
    id: int
    case_key: str
    state: str
    received_at: float
    updated_at: float
    ready: int
    stage: str
    progress: float
    result_version: int | None
    result_dir: str
    reason: str
    attempts: int
    single: int
    last_slide_at: float
    started_at: float | None
    finished_at: float | None
    last_error: str
    next_attempt_at: float
    pending_version: int | None


@dataclass(frozen=True)
class ServiceRow:
    """The service's own row: who runs it, with what, and when it last said so."""

    pid: int
    host: str
    started_at: float
    heartbeat_at: float
    bundle: str
    backend: str
    software_version: str
    stopped_at: float | None  # set on a clean stop; None while running or after a crash


@dataclass(frozen=True)
class ResultRecord:
    """One result version of a case and the bundle that wrote it (schema 2)."""

    case_id: int
    version: int
    bundle_name: str
    bundle_version: str
    bundle_sha256: str
    backend: str
    written_at: float


@dataclass(frozen=True)
class FinishedSlide:
    """A slide scored outside the service (``JobStore.record_finished_case``)."""

    path: str
    state: str  # done | rejected
    fingerprint: str | None = None  # None: the reader refused it (as ``reject_slide``)
    reason: str = ""
    n_cells: int | None = None
    size: int = 0
    mtime: float = 0.0


@dataclass(frozen=True)
class StoreSnapshot:
    """Every case and slide and the service row, from one read transaction."""

    cases: tuple[Case, ...]
    slides: tuple[Slide, ...]
    service: ServiceRow | None


def store_path(state_dir: Path) -> Path:
    return state_dir / STORE_FILE


_Row = TypeVar("_Row", Case, Slide)


def _row(cls: type[_Row], row: sqlite3.Row, **changes: Any) -> _Row:
    """A row as its dataclass, taking only the columns this release knows: a later
    release may add columns, and a reader left running across an upgrade keeps working."""
    return cls(**{f.name: changes.get(f.name, row[f.name]) for f in fields(cls)})


def _connect(path: Path, *, readonly: bool, timeout: float) -> sqlite3.Connection:
    if readonly:
        if not path.is_file():
            raise StoreError(f"no job store at {path} (has the service run yet?)")
        uri = f"{path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a power cut may lose the last commit, never corrupt.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    conn.row_factory = sqlite3.Row
    return conn


class JobStore:
    """One connection to the store; create one per thread."""

    def __init__(self, path: Path, *, readonly: bool = False, timeout: float = 10.0) -> None:
        self.path = path
        self.readonly = readonly
        # The schema version this store had before this open migrated it (None: no change).
        self.migrated_from: int | None = None
        try:
            self._conn = _connect(path, readonly=readonly, timeout=timeout)
            if readonly:
                # A reader may meet a store the service has not migrated yet.
                self.schema_version = check_readable(self._conn, path)
                self._conn.execute("SELECT 1 FROM cases LIMIT 1")
            else:
                self.migrated_from = migrate(self._conn, path)
                self.schema_version = SCHEMA_VERSION
        except SchemaError as exc:
            raise StoreError(str(exc)) from None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the job store {path}: {exc}") from None

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; BEGIN IMMEDIATE so it never deadlocks."""
        if self.readonly:
            raise StoreError("the job store was opened read-only")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed (a full disk) may leave the transaction open.
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    # --- reading ----------------------------------------------------------

    def slide(self, slide_id: int) -> Slide:
        row = self._conn.execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone()
        if row is None:
            raise StoreError(f"no slide {slide_id} in the job store")
        return _row(Slide, row)

    def slide_by_path(self, path: str) -> Slide | None:
        row = self._conn.execute("SELECT * FROM slides WHERE path = ?", (path,)).fetchone()
        return _row(Slide, row) if row else None

    def case(self, case_id: int) -> Case:
        row = self._conn.execute("SELECT * FROM cases WHERE id = ?", (case_id,)).fetchone()
        if row is None:
            raise StoreError(f"no case {case_id} in the job store")
        return _row(Case, row)

    def case_by_key(self, case_key: str) -> Case | None:
        row = self._conn.execute("SELECT * FROM cases WHERE case_key = ?", (case_key,)).fetchone()
        return _row(Case, row) if row else None

    def cases(self) -> list[Case]:
        rows = self._conn.execute("SELECT * FROM cases ORDER BY received_at, id").fetchall()
        return [_row(Case, r) for r in rows]

    def slides(self, case_id: int | None = None) -> list[Slide]:
        if case_id is None:
            rows = self._conn.execute("SELECT * FROM slides ORDER BY seen_at, id").fetchall()
        else:
            rows = self._conn.execute(
                "SELECT * FROM slides WHERE case_id = ? ORDER BY seen_at, id", (case_id,)
            ).fetchall()
        return [_row(Slide, r) for r in rows]

    def next_slide_job(self, now: float) -> Slide | None:
        row = self._conn.execute(
            "SELECT * FROM slides WHERE state = ? AND next_attempt_at <= ? "
            "ORDER BY seen_at, id LIMIT 1",
            (QUEUED, now),
        ).fetchone()
        return _row(Slide, row) if row else None

    def next_case_job(self, now: float) -> Case | None:
        row = self._conn.execute(
            "SELECT * FROM cases WHERE state = ? AND next_attempt_at <= ? "
            "ORDER BY received_at, id LIMIT 1",
            (QUEUED, now),
        ).fetchone()
        return _row(Case, row) if row else None

    def results(self, case_id: int) -> list[ResultRecord]:
        """The result versions of a case recorded since schema 2, oldest first."""
        if self.schema_version < 2:
            return []
        rows = self._conn.execute(
            "SELECT * FROM results WHERE case_id = ? ORDER BY version", (case_id,)
        ).fetchall()
        return [ResultRecord(**dict(r)) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """How many cases and slides are in each state."""
        out: dict[str, dict[str, int]] = {"cases": {}, "slides": {}}
        for table in ("cases", "slides"):
            for state, n in self._conn.execute(
                f"SELECT state, COUNT(*) FROM {table} GROUP BY state"
            ).fetchall():
                out[table][state] = n
        return out

    def service_info(self) -> ServiceRow | None:
        row = self._conn.execute(
            "SELECT pid, host, started_at, heartbeat_at, bundle, backend, software_version, "
            "stopped_at FROM service WHERE id = 1"
        ).fetchone()
        return None if row is None else ServiceRow(*row)

    def data_version(self) -> int:
        """Changes exactly when another connection has committed (SQLite's data_version):
        a reader that polls asks this first, so an idle store costs one pragma."""
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the job store {self.path}: {exc}") from None

    def snapshot(self) -> StoreSnapshot:
        """Cases, slides and the service row as of one moment (one read transaction)."""
        try:
            self._conn.execute("BEGIN")
            try:
                return StoreSnapshot(tuple(self.cases()), tuple(self.slides()), self.service_info())
            finally:
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the job store {self.path}: {exc}") from None

    # --- the watcher's writes -----------------------------------------------

    def ensure_case(self, case_key: str, *, single: bool, now: float) -> Case:
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO cases(case_key, state, received_at, updated_at, "
                "single, last_slide_at) VALUES (?, ?, ?, ?, ?, ?)",
                (case_key, WAITING, now, now, int(single), now),
            )
        case = self.case_by_key(case_key)
        assert case is not None  # inserted or already there
        return case

    def add_waiting_slide(
        self, case_key: str, path: str, size: int, mtime: float, *, single: bool, now: float
    ) -> Slide:
        """A unit seen for the first time: a waiting row. Its case collects again only
        once the unit is admitted or rejected: a unit can be a passing shape of a folder
        being written or deleted, and vanish without ever being a scan."""
        case = self.ensure_case(case_key, single=single, now=now)
        with self._write() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO slides(case_id, path, size, mtime, state, seen_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (case.id, path, size, mtime, WAITING, now),
            ).rowcount
            if inserted:
                conn.execute(
                    "UPDATE cases SET last_slide_at = ?, updated_at = ? WHERE id = ?",
                    (now, now, case.id),
                )
        slide = self.slide_by_path(path)
        assert slide is not None
        return slide

    def update_waiting(self, slide_id: int, size: int, mtime: float, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET size = ?, mtime = ? WHERE id = ? AND state = ?",
                (size, mtime, slide_id, WAITING),
            )

    def admit_slide(
        self,
        slide_id: int,
        *,
        fingerprint: str,
        bundle_hash: str,
        size: int,
        mtime: float,
        now: float,
    ) -> Slide:
        """A complete, readable unit: queued, or a copy of content already held."""
        with self._write() as conn:
            case_id, previous = conn.execute(
                "SELECT case_id, state FROM slides WHERE id = ?", (slide_id,)
            ).fetchone()
            self._case_changed(conn, case_id, previous, now)
            original = conn.execute(
                "SELECT id, path FROM slides WHERE fingerprint = ? AND bundle_hash = ? "
                "AND duplicate_of IS NULL AND id != ?",
                (fingerprint, bundle_hash, slide_id),
            ).fetchone()
            if original is None:
                conn.execute(
                    "UPDATE slides SET fingerprint = ?, bundle_hash = ?, size = ?, mtime = ?, "
                    "state = ?, reason = '', last_error = '', duplicate_of = NULL, "
                    "attempts = 0, next_attempt_at = 0, n_cells = NULL WHERE id = ?",
                    (fingerprint, bundle_hash, size, mtime, QUEUED, slide_id),
                )
            else:
                conn.execute(
                    "UPDATE slides SET fingerprint = ?, bundle_hash = ?, size = ?, mtime = ?, "
                    "state = ?, duplicate_of = ?, reason = ?, finished_at = ? WHERE id = ?",
                    (
                        fingerprint,
                        bundle_hash,
                        size,
                        mtime,
                        DONE,
                        original["id"],
                        f"same scan as {original['path']}: already scored, not scored again",
                        now,
                        slide_id,
                    ),
                )
        return self.slide(slide_id)

    def reject_slide(
        self, slide_id: int, reason: str, now: float, *, size: int, mtime: float
    ) -> None:
        """Not a usable scan (unsupported, unreadable): no pipeline run, the reason kept."""
        with self._write() as conn:
            row = conn.execute("SELECT case_id, state FROM slides WHERE id = ?", (slide_id,))
            case_id, previous = row.fetchone()
            conn.execute(
                "UPDATE slides SET state = ?, reason = ?, finished_at = ?, stage = '', "
                "progress = 0, size = ?, mtime = ?, fingerprint = NULL, duplicate_of = NULL "
                "WHERE id = ?",
                (REJECTED, reason, now, size, mtime, slide_id),
            )
            self._case_changed(conn, case_id, previous, now)

    def move_slide(self, slide_id: int, new_path: str) -> None:
        """The input was moved to the archive: remember where it is now."""
        with self._write() as conn:
            conn.execute("UPDATE slides SET path = ? WHERE id = ?", (new_path, slide_id))

    def move_result_dir(self, old: str, new: str) -> int:
        """A result version folder was moved (``migrate_case_folders``): the cases that
        name it follow; how many did."""
        with self._write() as conn:
            return conn.execute(
                "UPDATE cases SET result_dir = ? WHERE result_dir = ?", (new, old)
            ).rowcount

    def touch_slide(self, slide_id: int, size: int, mtime: float) -> None:
        """Same bytes with a new mtime (touched, copied over): remember the new stat."""
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET size = ?, mtime = ? WHERE id = ?", (size, mtime, slide_id)
            )

    def forget_slide(self, slide_id: int) -> None:
        """A waiting unit that vanished before it was complete (e.g. renamed away);
        a case left without any slide goes with it."""
        with self._write() as conn:
            row = conn.execute("SELECT case_id FROM slides WHERE id = ?", (slide_id,)).fetchone()
            conn.execute("DELETE FROM slides WHERE id = ? AND state = ?", (slide_id, WAITING))
            if row is not None:
                conn.execute(
                    "DELETE FROM cases WHERE id = ? AND state = ? "
                    "AND NOT EXISTS (SELECT 1 FROM slides WHERE case_id = cases.id)",
                    (row["case_id"], WAITING),
                )

    def set_case_ready(self, case_id: int, ready: bool, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE cases SET ready = ?, updated_at = ? WHERE id = ? AND ready != ?",
                (int(ready), now, case_id, int(ready)),
            )

    # --- the worker's writes --------------------------------------------------

    def recover(self, max_attempts: int, now: float) -> list[tuple[str, int, str]]:
        """Rows left running by a crash go back to queued; a job that keeps crashing
        the service (attempts counted at start) fails instead of looping forever.
        Returns (kind, id, new state) for each row touched."""
        touched: list[tuple[str, int, str]] = []
        reason = "the service stopped while processing it {n} times; not retried"
        with self._write() as conn:
            for table, kind in (("slides", "slide"), ("cases", "case")):
                rows = conn.execute(
                    f"SELECT id, attempts FROM {table} WHERE state = ?", (RUNNING,)
                ).fetchall()
                for row in rows:
                    if row["attempts"] >= max_attempts:
                        conn.execute(
                            f"UPDATE {table} SET state = ?, reason = ?, stage = '', "
                            "progress = 0, finished_at = ? WHERE id = ?",
                            (FAILED, reason.format(n=row["attempts"]), now, row["id"]),
                        )
                        touched.append((kind, row["id"], FAILED))
                    else:
                        conn.execute(
                            f"UPDATE {table} SET state = ?, stage = '', progress = 0, "
                            "next_attempt_at = 0 WHERE id = ?",
                            (QUEUED, row["id"]),
                        )
                        touched.append((kind, row["id"], QUEUED))
        return touched

    def start_slide(self, slide_id: int, now: float) -> Slide:
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET state = ?, stage = 'starting', progress = 0, "
                "attempts = attempts + 1, started_at = ? WHERE id = ?",
                (RUNNING, now, slide_id),
            )
        return self.slide(slide_id)

    def slide_progress(self, slide_id: int, stage: str, progress: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET stage = ?, progress = ? WHERE id = ? AND state = ?",
                (stage, max(0.0, min(1.0, progress)), slide_id, RUNNING),
            )

    def finish_slide(
        self, slide_id: int, state: str, *, reason: str = "", n_cells: int | None, now: float
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET state = ?, reason = ?, n_cells = ?, finished_at = ?, "
                "stage = '', progress = ?, rescore = 0 WHERE id = ?",
                (state, reason, n_cells, now, 1.0 if state == DONE else 0.0, slide_id),
            )

    def retry_slide(self, slide_id: int, error: str, at: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET state = ?, last_error = ?, next_attempt_at = ?, stage = '', "
                "progress = 0 WHERE id = ?",
                (QUEUED, error, at, slide_id),
            )

    def fail_slide(self, slide_id: int, error: str, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET state = ?, last_error = ?, reason = ?, finished_at = ?, "
                "stage = '', progress = 0, rescore = 0 WHERE id = ?",
                (FAILED, error, error, now, slide_id),
            )

    def abandon_slide(self, slide_id: int) -> None:
        """Stopped on purpose (SIGTERM) or held (``appliance.service.pause``): a running
        slide goes back to queued, the attempt not counted."""
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET state = ?, stage = '', progress = 0, "
                "attempts = MAX(attempts - 1, 0) WHERE id = ? AND state = ?",
                (QUEUED, slide_id, RUNNING),
            )

    def promote_ready_cases(self, case_quiet_seconds: float, now: float) -> list[Case]:
        """Waiting cases whose slides are all finished and that are ready: `.ready`,
        a loose file (a case of one), or no new slide for the quiet period."""
        promoted = []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT c.* FROM cases c WHERE c.state = ? "
                "AND EXISTS (SELECT 1 FROM slides s WHERE s.case_id = c.id) "
                "AND NOT EXISTS (SELECT 1 FROM slides s WHERE s.case_id = c.id "
                "                AND s.state IN (?, ?, ?)) "
                "AND (c.ready = 1 OR c.single = 1 OR c.last_slide_at <= ?)",
                (WAITING, WAITING, QUEUED, RUNNING, now - case_quiet_seconds),
            ).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE cases SET state = ?, updated_at = ? WHERE id = ?",
                    (QUEUED, now, row["id"]),
                )
                promoted.append(_row(Case, row, state=QUEUED))
        return promoted

    def start_case(self, case_id: int, pending_version: int, now: float) -> Case:
        """Running; the version this job will write is noted first, so a crash after
        the result was renamed into place is recognised and not written twice."""
        with self._write() as conn:
            conn.execute(
                "UPDATE cases SET state = ?, stage = 'starting', progress = 0, "
                "attempts = attempts + 1, started_at = ?, updated_at = ?, pending_version = ? "
                "WHERE id = ?",
                (RUNNING, now, now, pending_version, case_id),
            )
        return self.case(case_id)

    def case_progress(self, case_id: int, stage: str, progress: float, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE cases SET stage = ?, progress = ?, updated_at = ? "
                "WHERE id = ? AND state = ?",
                (stage, max(0.0, min(1.0, progress)), now, case_id, RUNNING),
            )

    def finish_case(
        self,
        case_id: int,
        state: str,
        *,
        reason: str,
        result_version: int | None,
        result_dir: str,
        now: float,
        written_by: BundleIdentity | None = None,
        backend: str = "",
    ) -> None:
        """``written_by``: the bundle of a result this job wrote (not one it adopted
        from a copy), recorded with its version in ``results``."""
        with self._write() as conn:
            if written_by is not None and result_version is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO results(case_id, version, bundle_name, "
                    "bundle_version, bundle_sha256, backend, written_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        case_id,
                        result_version,
                        written_by.name,
                        written_by.version,
                        written_by.sha256,
                        backend,
                        now,
                    ),
                )
            conn.execute(
                "UPDATE cases SET state = ?, reason = ?, result_version = ?, result_dir = ?, "
                "finished_at = ?, updated_at = ?, stage = '', progress = ?, "
                "pending_version = NULL, last_error = '', attempts = 0 WHERE id = ?",
                (
                    state,
                    reason,
                    result_version,
                    result_dir,
                    now,
                    now,
                    1.0 if state == DONE else 0.0,
                    case_id,
                ),
            )
            # A scan admitted or rejected while this job ran (queued, or finished after
            # the job started): collect again, re-score later. One still being written
            # reopens the case when it is admitted.
            conn.execute(
                "UPDATE cases SET state = ? WHERE id = ? AND EXISTS (SELECT 1 FROM slides s "
                "WHERE s.case_id = cases.id AND (s.state IN (?, ?) "
                "OR (s.state != ? AND s.finished_at > cases.started_at)))",
                (WAITING, case_id, QUEUED, RUNNING, WAITING),
            )

    def retry_case(self, case_id: int, error: str, at: float, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE cases SET state = ?, last_error = ?, reason = ?, next_attempt_at = ?, "
                "stage = '', progress = 0, updated_at = ? WHERE id = ?",
                (QUEUED, error, f"will retry: {error}", at, now, case_id),
            )

    def fail_case(self, case_id: int, error: str, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE cases SET state = ?, last_error = ?, reason = ?, finished_at = ?, "
                "updated_at = ?, stage = '', progress = 0, pending_version = NULL WHERE id = ?",
                (FAILED, error, error, now, now, case_id),
            )

    def abandon_case(self, case_id: int, now: float) -> None:
        """As ``abandon_slide``, for a running case."""
        with self._write() as conn:
            conn.execute(
                "UPDATE cases SET state = ?, stage = '', progress = 0, updated_at = ?, "
                "attempts = MAX(attempts - 1, 0) WHERE id = ? AND state = ?",
                (QUEUED, now, case_id, RUNNING),
            )

    # --- cases scored outside the service (``cytoedge demo``) ---------------------

    def record_finished_case(
        self,
        case_key: str,
        slides: Sequence[FinishedSlide],
        *,
        state: str,
        reason: str,
        result_version: int | None,
        result_dir: str,
        bundle_hash: str,
        now: float,
        written_by: BundleIdentity | None = None,
        backend: str = "",
    ) -> Case:
        """A case scored by another process, recorded as the worker leaves a finished
        case, in one transaction: the window and ``cytoedge status`` list it, and a
        re-score asks the service to score it again. Slides are matched by path; content
        the store already holds under this bundle in another row is recorded as a copy
        of it. Refused (StoreError) while the service has work on that case."""
        if state not in TERMINAL or any(s.state not in TERMINAL for s in slides):
            raise StoreError(f"case {case_key}: only finished cases and slides are recorded")
        pending = (WAITING, QUEUED, RUNNING)
        with self._write() as conn:
            busy = conn.execute(
                "SELECT c.state FROM cases c WHERE c.case_key = ? AND (c.state IN (?, ?, ?) "
                "OR EXISTS (SELECT 1 FROM slides s WHERE s.case_id = c.id AND s.state IN "
                "(?, ?, ?)))",
                (case_key, *pending, *pending),
            ).fetchone()
            if busy is not None:
                raise StoreError(
                    f"case {case_key} is in the service's queue ({busy['state']}): not recorded"
                )
            conn.execute(
                "INSERT OR IGNORE INTO cases(case_key, state, received_at, updated_at, "
                "single, last_slide_at) VALUES (?, ?, ?, ?, ?, ?)",
                (case_key, state, now, now, int(len(slides) == 1), now),
            )
            case_id = conn.execute(
                "SELECT id FROM cases WHERE case_key = ?", (case_key,)
            ).fetchone()["id"]
            for slide in slides:
                self._record_finished_slide(conn, case_id, slide, bundle_hash, now)
            if written_by is not None and result_version is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO results(case_id, version, bundle_name, "
                    "bundle_version, bundle_sha256, backend, written_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (case_id, result_version, written_by.name, written_by.version,
                     written_by.sha256, backend, now),
                )  # fmt: skip
            conn.execute(
                "UPDATE cases SET state = ?, reason = ?, result_version = ?, result_dir = ?, "
                "ready = 1, stage = '', progress = ?, attempts = 0, last_error = '', "
                "next_attempt_at = 0, pending_version = NULL, started_at = ?, "
                "finished_at = ?, updated_at = ? WHERE id = ?",
                (state, reason, result_version, result_dir, 1.0 if state == DONE else 0.0,
                 now, now, now, case_id),
            )  # fmt: skip
        return self.case(case_id)

    @staticmethod
    def _record_finished_slide(
        conn: sqlite3.Connection, case_id: int, slide: FinishedSlide, bundle_hash: str, now: float
    ) -> None:
        original = None
        if slide.fingerprint is not None:
            original = conn.execute(
                "SELECT id FROM slides WHERE fingerprint = ? AND bundle_hash = ? "
                "AND duplicate_of IS NULL AND path != ?",
                (slide.fingerprint, bundle_hash, slide.path),
            ).fetchone()
        conn.execute(
            "INSERT OR IGNORE INTO slides(case_id, path, state, seen_at) VALUES (?, ?, ?, ?)",
            (case_id, slide.path, slide.state, now),
        )
        conn.execute(
            "UPDATE slides SET case_id = ?, state = ?, reason = ?, n_cells = ?, "
            "fingerprint = ?, bundle_hash = ?, duplicate_of = ?, size = ?, mtime = ?, "
            "stage = '', progress = ?, attempts = 1, last_error = '', next_attempt_at = 0, "
            "rescore = 0, started_at = ?, finished_at = ? WHERE path = ?",
            (case_id, slide.state, slide.reason, slide.n_cells, slide.fingerprint,
             bundle_hash if slide.fingerprint is not None else "",
             original["id"] if original is not None else None, slide.size, slide.mtime,
             1.0 if slide.state == DONE else 0.0, now, now, slide.path),
        )  # fmt: skip

    # --- rescore (any process may call this) ------------------------------------

    def request_rescore_slide(self, slide_id: int, now: float) -> Slide:
        """Process the slide again (caches bypassed) and re-score its case."""
        slide = self.slide(slide_id)
        target = self.slide(slide.duplicate_of) if slide.duplicate_of else slide
        with self._write() as conn:
            conn.execute(
                "UPDATE slides SET state = ?, rescore = 1, attempts = 0, next_attempt_at = 0, "
                "reason = '', last_error = '', stage = '', progress = 0 "
                "WHERE id = ? AND state != ? AND fingerprint IS NOT NULL",
                (QUEUED, target.id, RUNNING),
            )
            self._reopen_case(conn, target.case_id, now)
        return self.slide(target.id)

    def request_rescore_case(self, case_id: int, now: float) -> list[Slide]:
        targets = [s for s in self.slides(case_id) if s.state != WAITING]
        return [self.request_rescore_slide(s.id, now) for s in targets] or (
            self._reopen_case_only(case_id, now)
        )

    def request_score_now(self, case_id: int, now: float) -> bool:
        """Score a case collecting slides as soon as its slides are processed, without
        waiting for its quiet period (what its `.ready` file does); False when it is no
        longer waiting."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE cases SET ready = 1, updated_at = ? WHERE id = ? AND state = ?",
                (now, case_id, WAITING),
            ).rowcount
        return bool(changed)

    def _reopen_case_only(self, case_id: int, now: float) -> list[Slide]:
        with self._write() as conn:
            self._reopen_case(conn, case_id, now)
        return []

    @classmethod
    def _case_changed(
        cls, conn: sqlite3.Connection, case_id: int, previous: str, now: float
    ) -> None:
        """A unit of the case was admitted or rejected. New content under a known name:
        the case is scored again as soon as it is processed. A new unit: the case
        collects again (a case folder waits for its `.ready` or quiet period)."""
        if previous != WAITING:
            cls._reopen_case(conn, case_id, now)
            return
        conn.execute(
            "UPDATE cases SET state = ?, reason = '', attempts = 0, last_error = '', "
            "next_attempt_at = 0 WHERE id = ? AND state != ?",
            (WAITING, case_id, RUNNING),
        )

    @staticmethod
    def _reopen_case(conn: sqlite3.Connection, case_id: int, now: float) -> None:
        conn.execute(
            "UPDATE cases SET state = ?, ready = 1, reason = '', attempts = 0, "
            "last_error = '', next_attempt_at = 0, updated_at = ? WHERE id = ? AND state != ?",
            (WAITING, now, case_id, RUNNING),
        )

    # --- service presence -------------------------------------------------------

    def register_service(
        self, pid: int, host: str, bundle: str, backend: str, software_version: str, now: float
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO service(id, pid, host, started_at, heartbeat_at, "
                "bundle, backend, software_version, stopped_at) "
                "VALUES (1, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (pid, host, now, now, bundle, backend, software_version),
            )

    def service_bundle(self, bundle: str) -> None:
        """The service switched to another bundle between jobs."""
        with self._write() as conn:
            conn.execute("UPDATE service SET bundle = ? WHERE id = 1", (bundle,))

    def service_stopped(self, now: float) -> None:
        """A clean stop: readers need not wait for the heartbeat to go stale."""
        with self._write() as conn:
            conn.execute("UPDATE service SET stopped_at = ? WHERE id = 1", (now,))

    def heartbeat(self, now: float | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE service SET heartbeat_at = ? WHERE id = 1",
                (time.time() if now is None else now,),
            )
