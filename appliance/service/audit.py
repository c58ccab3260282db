"""Append-only, hash-chained audit trail: one JSON object per line beside the job store.

Every record carries ``seq`` (its number in the whole trail, from 1) and
``prev_sha256``: the sha256 of the exact bytes of the line before it, its newline
included (``GENESIS`` for the trail's first record). An edited, deleted or moved
line therefore no longer matches the record after it; ``appliance.service.
audit_verify`` walks the chain and says where. The chain shows tampering with
any record but the newest: that one, or lines cut from the end, show only
against a copy of the last hash (``cytoedge audit verify`` prints it).

Writers in several processes (the service, a window signing off) take turns: one
holds an exclusive flock on the file from reading its last line until its own
line is written, so the chain never forks. A line is one ``write`` on a
descriptor opened with O_APPEND, then fsync'd; a crash loses at most the line
being written, and the next writer ends that torn line with a newline and chains
to it as it is. Nothing ever rewrites or truncates a file.

Rotation: a writer that finds the file at ``max_bytes`` or more renames it to
``audit-000001.jsonl`` (the next free number) under its lock, and its record
starts a new ``audit.jsonl`` that chains to the last line of the renamed one.
Records written before the chain existed (no ``prev_sha256``) stay as they are:
the chain's first record chains to the last of them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config import AuditConfig
from runtime.files import sha256_file

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64  # what the trail's first record chains to
_TAIL_BYTES = 1 << 16


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")


def line_hash(line: bytes) -> str:
    """The hash a record holds of the line before it: of its bytes and the newline that
    ends it (added to a line a crash cut short, as the next writer does on disk)."""
    return hashlib.sha256(line if line.endswith(b"\n") else line + b"\n").hexdigest()


def rotated_name(current: Path, number: int) -> Path:
    """``audit.jsonl`` -> ``audit-000001.jsonl`` beside it."""
    return current.with_name(f"{current.stem}-{number:06d}{current.suffix}")


def rotated_files(current: Path) -> list[tuple[int, Path]]:
    """The trail's renamed files beside ``current``, by number, oldest first."""
    pattern = re.compile(rf"^{re.escape(current.stem)}-(\d{{6,}}){re.escape(current.suffix)}$")
    if not current.parent.is_dir():
        return []
    found = []
    for child in current.parent.iterdir():
        match = pattern.match(child.name)
        if match and child.is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def result_file_hashes(folder: Path) -> dict[str, str]:
    """Every file in a result version folder: its path inside the folder -> sha256."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class AuditLog:
    """Writes audit records; the fields every record carries are fixed at start.
    ``max_bytes`` (``[audit] max_bytes``): rotate the file once it is this large; 0 never."""

    def __init__(
        self, path: Path, *, max_bytes: int = AuditConfig.max_bytes, **common: Any
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.common = {"host": socket.gethostname(), **common}
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def set_common(self, **fields: Any) -> None:
        """Change fields every later record carries (the service switched bundles)."""
        with self._lock:
            self.common = {**self.common, **fields}

    def record(self, event: str, **fields: Any) -> None:
        """Append one record, chained to the trail's last line."""
        with self._lock:
            entry = {
                "time": iso(datetime.now(tz=UTC).timestamp()),
                "event": event,
                **self.common,
                **fields,
            }
            fd = _open_for_append(self.path, self.max_bytes)
            try:
                size = os.fstat(fd).st_size
                previous, seq = self._previous(fd, size)
                entry["seq"] = seq + 1
                entry["prev_sha256"] = line_hash(previous) if previous else GENESIS
                line = json.dumps(entry, default=str, ensure_ascii=False) + "\n"
                torn = size > 0 and not previous.endswith(b"\n")
                os.write(fd, (b"\n" if torn else b"") + line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)  # releases the flock

    def _previous(self, fd: int, size: int) -> tuple[bytes, int]:
        """The line the next record follows (b"" for none) and the last record number."""
        if size:
            return _last_line(fd, size), _last_seq(fd, size)
        rotated = rotated_files(self.path)
        if not rotated:
            return b"", 0
        with rotated[-1][1].open("rb") as handle:
            end = os.fstat(handle.fileno()).st_size
            return _last_line(handle.fileno(), end), _last_seq(handle.fileno(), end)


def _open_locked(path: Path) -> int:
    """A descriptor of ``path`` (created when missing) under an exclusive flock; opened
    again when another writer renamed the file away while this one waited for the lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, named = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                return fd
        except FileNotFoundError:
            pass  # renamed and not yet created again
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _open_for_append(path: Path, max_bytes: int) -> int:
    """``_open_locked``, after renaming the file away when it has reached ``max_bytes``."""
    fd = _open_locked(path)
    if not max_bytes or os.fstat(fd).st_size < max_bytes:
        return fd
    try:
        _rotate(path)
    finally:
        os.close(fd)
    return _open_locked(path)


def _rotate(path: Path) -> None:
    """Rename the current file to the next number (the caller holds its flock)."""
    rotated = rotated_files(path)
    os.rename(path, rotated_name(path, rotated[-1][0] + 1 if rotated else 1))
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)  # the rename survives a crash
    finally:
        os.close(folder)


def _last_line(fd: int, end: int) -> bytes:
    """The line that ends at byte ``end`` of the file (with its newline, unless a crash
    cut it short); b"" at the start of the file."""
    window = _TAIL_BYTES
    while True:
        start = max(0, end - window)
        data = os.pread(fd, end - start, start)
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0 or start == 0:
            return data[cut + 1 :]
        window *= 4


def _last_seq(fd: int, end: int) -> int:
    """The number of the last chained record before byte ``end``; 0 when a record from
    before the chain (or the start of the file) comes first. Torn lines are passed over."""
    while end > 0:
        line = _last_line(fd, end)
        end -= len(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            seq = record.get("seq")
            return seq if isinstance(seq, int) and "prev_sha256" in record else 0
    return 0


def trail_files(path: Path) -> list[Path]:
    """The trail's files in the order written: the renamed ones, then the current one."""
    files = [file for _, file in rotated_files(path)]
    return [*files, path] if path.is_file() else files


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All records, rotated files first; a torn line (a crash mid-write) is skipped."""
    records = []
    for file in trail_files(path):
        for line in file.read_bytes().split(b"\n"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
