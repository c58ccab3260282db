"""The service's pause note: why it holds its work, where a person looks.

``<state>/paused`` is a file of fixed size written in place: rewriting blocks it
already owns needs no free space, so it can still say "data disk full" on a full
disk, where the job store (a SQLite write) cannot. The service
(``appliance.service.pause``) writes it; ``cytoedge status``, ``cytoedge doctor``
and the window read it. The service rewrites it every few seconds, so its time
says the service is alive when the store's heartbeat cannot be written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PAUSE_FILE = "paused"
_NOTE_BYTES = 4096


class PauseNote:
    """The service's side: the current reason, rewritten in place ("" clears it)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PAUSE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reason = ""
        self._lock = threading.Lock()  # the worker says, the supervisor beats
        # Made once, at start, while there is room; later writes reuse its blocks.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            os.ftruncate(fd, _NOTE_BYTES)
            os.pwrite(fd, _padded(""), 0)
        finally:
            os.close(fd)

    def say(self, reason: str) -> None:
        """Write ``reason`` ("" clears it) with the time now."""
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, _padded(reason), 0)
            finally:
                os.close(fd)
            self.reason = reason

    def beat(self) -> None:
        """The same reason, the time now."""
        with self._lock:
            reason = self.reason
        self.say(reason)


def _padded(reason: str) -> bytes:
    note = {"paused": reason[:1000], "at": round(time.time(), 1)}
    return json.dumps(note, ensure_ascii=True).encode("ascii").ljust(_NOTE_BYTES, b" ")


@dataclass(frozen=True)
class Pause:
    """What the note says: why work is held ("" when it is not), and when it was written."""

    reason: str = ""
    at: float = 0.0


def read_pause(state_dir: Path) -> Pause:
    """The service's pause note (empty when the service never ran or the note is torn)."""
    try:
        note = json.loads((state_dir / PAUSE_FILE).read_bytes().strip() or b"{}")
        return Pause(str(note.get("paused", "")), float(note.get("at", 0.0)))
    except (OSError, ValueError, AttributeError, TypeError):
        return Pause()
