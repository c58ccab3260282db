"""Who may read the data directory: the service account, and the technicians' group.

Everything below the data directory is patient data or leads to it (results, FHIR
bundles, the slide cache, the audit trail, the job store, logs), so nothing there
is world-readable or world-writable: folders 0750 (2770 where ``install.sh`` lets
the group write: the inbox, the state folder), files 0640. cytoedge sets the umask
0027 when it starts (the systemd unit does too), and folders made by
``tempfile.mkdtemp`` (0700) are made group-readable before they are renamed into
place (``runtime.files``). ``cytoedge doctor`` looks for paths that escaped this.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OpenPaths:
    """Paths anyone on the machine may read or write; ``complete``: every path was seen."""

    paths: tuple[tuple[Path, int], ...]  # (path, mode)
    checked: int
    complete: bool


def open_paths(roots: Iterable[Path], seconds: float = 5.0, most: int = 20) -> OpenPaths:
    """Walk ``roots`` (not following links) for world-readable or world-writable paths,
    for at most ``seconds``; keep the first ``most``."""
    deadline = time.monotonic() + seconds
    found: list[tuple[Path, int]] = []
    checked = 0
    stack = [root for root in roots if root.exists()]
    seen: set[Path] = set()
    while stack:
        if time.monotonic() > deadline:
            return OpenPaths(tuple(found), checked, complete=False)
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            info = path.lstat()
        except OSError:
            continue
        checked += 1
        if stat.S_ISLNK(info.st_mode):
            continue
        if info.st_mode & (stat.S_IROTH | stat.S_IWOTH) and len(found) < most:
            found.append((path, stat.S_IMODE(info.st_mode)))
        if stat.S_ISDIR(info.st_mode):
            try:
                stack.extend(Path(entry.path) for entry in os.scandir(path))
            except OSError:
                continue
    return OpenPaths(tuple(found), checked, complete=True)
