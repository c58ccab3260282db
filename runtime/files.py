"""Files on disk, the one way: content hashes and atomic writes.

Every part of cytoedge (the runtime's engine cache, bundles, export folders,
result folders) hashes and writes files through these, so a reader never sees
a half-written file and a hash means the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20
# What cytoedge writes is its account's and its group's (the technicians read results),
# nobody else's: files 0640, folders 0750 (appliance.site.permissions checks).
UMASK = 0o027
FOLDER_MODE = 0o750


def restrict_umask() -> None:
    """Files 0640 and folders 0750 from here on, in this process and its children."""
    os.umask(UMASK)


def group_readable(folder: Path) -> None:
    """A folder ``tempfile.mkdtemp`` made private (0700), readable by the group like
    any other before it is renamed into place."""
    os.chmod(folder, FOLDER_MODE)


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes, in lower-case hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; once the block has written it, it replaces
    ``target`` in one rename (after an fsync). On any error ``target`` is untouched
    and the temporary file is gone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: Path, obj: Any) -> None:
    """Indented UTF-8 JSON; numpy scalars and arrays and paths are written as plain values."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    write_text_atomic(target, text)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
