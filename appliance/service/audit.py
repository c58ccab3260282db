"""Append-only audit trail: one JSON object per line beside the job store.

Each line is written with a single ``write`` on a descriptor opened with
O_APPEND and then fsync'd, so lines from concurrent writers never interleave
and a crash loses at most the line being written. Nothing ever rewrites or
truncates the file.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """Writes audit records; the fields every record carries are fixed at start."""

    def __init__(self, path: Path, **common: Any) -> None:
        self.path = path
        self.common = {"host": socket.gethostname(), **common}
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def set_common(self, **fields: Any) -> None:
        """Change fields every later record carries (the service switched bundles)."""
        with self._lock:
            self.common = {**self.common, **fields}

    def record(self, event: str, **fields: Any) -> None:
        with self._lock:
            entry = {
                "time": iso(datetime.now(tz=UTC).timestamp()),
                "event": event,
                **self.common,
                **fields,
            }
            line = (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All records; a torn last line (a crash mid-write) is skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
