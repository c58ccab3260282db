"""The job store's schema, version by version, and the one way it moves forward.

A new store is created at schema 1 and migrated like any other, so a store
upgraded from an earlier release and a fresh one have the same shape. Every
migration runs in one transaction with its version recorded in ``meta``; a
failure leaves the store as it was. Before an existing store is migrated, a
copy is kept beside it (``jobs.sqlite.schema<N>``).

Migrations only add (tables, or columns with defaults): a reader of the
previous release, such as a technician's window left open across an upgrade,
keeps reading cases and slides.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

# Schema 1, as cytoedge 0.1.0 wrote it.
SCHEMA_1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY,
    case_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    result_version INTEGER,
    result_dir TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    single INTEGER NOT NULL DEFAULT 0,
    last_slide_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    last_error TEXT NOT NULL DEFAULT '',
    next_attempt_at REAL NOT NULL DEFAULT 0,
    pending_version INTEGER
)""",
    """CREATE TABLE IF NOT EXISTS slides (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL DEFAULT 0,
    mtime REAL NOT NULL DEFAULT 0,
    fingerprint TEXT,
    state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    seen_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    n_cells INTEGER,
    bundle_hash TEXT NOT NULL DEFAULT '',
    duplicate_of INTEGER REFERENCES slides(id),
    next_attempt_at REAL NOT NULL DEFAULT 0,
    rescore INTEGER NOT NULL DEFAULT 0
)""",
    # Idempotency: one live row per content and bundle; copies point at it.
    """CREATE UNIQUE INDEX IF NOT EXISTS slides_content ON slides(fingerprint, bundle_hash)
    WHERE fingerprint IS NOT NULL AND duplicate_of IS NULL""",
    "CREATE INDEX IF NOT EXISTS slides_case ON slides(case_id)",
    """CREATE TABLE IF NOT EXISTS service (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    bundle TEXT NOT NULL DEFAULT '',
    backend TEXT NOT NULL DEFAULT '',
    software_version TEXT NOT NULL DEFAULT '',
    stopped_at REAL
)""",
)

# (version, statements): each takes the store from the version before it.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        2,
        # Which bundle wrote each result version of a case: with bundles switched
        # between jobs, v1 and v2 of one case may come from different models.
        (
            """CREATE TABLE results (
    case_id INTEGER NOT NULL REFERENCES cases(id),
    version INTEGER NOT NULL,
    bundle_name TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    backend TEXT NOT NULL DEFAULT '',
    written_at REAL NOT NULL,
    PRIMARY KEY (case_id, version)
)""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaError(RuntimeError):
    """The store cannot be brought to this release's schema; the message is one line."""


def stored_version(conn: sqlite3.Connection) -> int | None:
    """The schema version the store records; None for a new, empty file."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def check_readable(conn: sqlite3.Connection, path: Path) -> int:
    """The store's schema version for a reader, which refuses one from a newer release
    (it may not know its rows)."""
    version = stored_version(conn) or 1
    if version > SCHEMA_VERSION:
        raise SchemaError(_newer(path, version))
    return version


def migrate(conn: sqlite3.Connection, path: Path) -> int | None:
    """Create or bring the store to ``SCHEMA_VERSION``; the version it came from, or None
    when nothing had to change. ``conn`` is in autocommit mode (isolation_level None)."""
    version = stored_version(conn)
    if version == SCHEMA_VERSION:
        return None
    if version is not None and version > SCHEMA_VERSION:
        raise SchemaError(_newer(path, version))
    if version is not None:
        _keep_copy(conn, path, version)
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again inside the write lock: another process may have migrated meanwhile.
        start = stored_version(conn)
        if start is None:
            for statement in SCHEMA_1:
                conn.execute(statement)
            conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
            start = 1
        for target, statements in MIGRATIONS:
            if target <= start:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(target),))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    if version is not None and start < SCHEMA_VERSION:
        log.warning(
            "job store migrated",
            extra={"store": str(path), "from": start, "to": SCHEMA_VERSION},
        )
        return start
    return None


def backup_path(path: Path, version: int) -> Path:
    return path.with_name(f"{path.name}.schema{version}")


def _keep_copy(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """A consistent copy of the store as it was, once per schema it is migrated from."""
    target = backup_path(path, version)
    if target.exists():
        return
    copy = sqlite3.connect(target)
    try:
        conn.backup(copy)
    finally:
        copy.close()


def _newer(path: Path, version: int) -> str:
    return (
        f"the job store {path} was written by a newer cytoedge (schema {version}; this one "
        f"reads up to {SCHEMA_VERSION}): install that release again or a newer one"
    )
