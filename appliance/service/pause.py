"""Why the service holds its work, said where a person looks.

Two things stop scoring that are no fault of a scan: a damaged model bundle and a
full data disk. While either lasts, the worker starts no job and spends no attempt;
it resumes by itself once the bundle is repaired (or another chosen) and the space
is back. The reason goes to the pause note (``appliance.site.pause_note``), which
``cytoedge status``, ``cytoedge doctor`` and the window read.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from appliance.readers.errors import ScanError
from appliance.service.store import Case, Slide
from appliance.site.pause_note import PauseNote

log = logging.getLogger(__name__)

MB = 1_000_000
# Room the job store, the audit trail and the log need to take any job at all.
STORE_MARGIN_BYTES = 2 * MB
# Room a case's result version needs: its report, gallery, top cells and slide pictures
# (about 1.2 MB measured), and each cell's picture (about 23 kB) and embedding.
CASE_BASE_BYTES = 2 * MB
RESULT_BYTES_PER_CELL = 30_000
# Free bytes on the file system holding a path (tests pass their own).
FreeBytes = Callable[[Path], int]


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def disk_full_text(disk: str, free: int, needed: int) -> str:
    return f"{disk} disk full: {free / MB:.0f} MB free, needs about {needed / MB:.0f} MB"


def damaged_text(problem: str) -> str:
    return (
        f"scoring paused: {problem}; repair the bundle or choose another with `cytoedge bundle use`"
    )


def is_disk_full(exc: BaseException) -> bool:
    """The error (or one it came from) says the disk or a quota is full, SQLite's
    "database or disk is full" included."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, sqlite3.Error) and (
            getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "database or disk is full" in str(current)
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


class WorkHold:
    """The worker asks it before each job (``reason``) and after one fails
    (``failed``): why no work may go on now, "" when it may. Each change is logged
    once and written to the pause note.

    ``bundle_problem(full)``: what is wrong with the bundle's files (``BundleFollower
    .problem``); ``slide_needs(path)``: the data disk a slide takes (``PipelineEngine
    .space_needed``); ``case_cells(case)``: the cells its slides gave. A slide that met
    a full disk anyway needs half as much again as was free when it started, before it
    is tried again.
    """

    def __init__(
        self,
        note: PauseNote,
        *,
        data_dir: Path,
        outbox: Path,
        bundle_problem: Callable[[bool], str] | None,
        slide_needs: Callable[[Path], int],
        case_cells: Callable[[Case], int],
        free: FreeBytes = free_bytes,
    ) -> None:
        self.note = note
        self.data_dir, self.outbox = data_dir, outbox
        self.bundle_problem = bundle_problem
        self.slide_needs = slide_needs
        self.case_cells = case_cells
        self.free = free
        self._estimates: dict[str, int] = {}  # by slide path
        self._waiting: tuple[Path, int] | None = None  # room a held job waits for
        self._free_at_start = 0

    def reason(self, job: Slide | Case | None) -> str:
        """Why ``job`` (None: any job) may not start now."""
        damaged = self.bundle_problem(False) if self.bundle_problem else ""
        if damaged:
            return self._say(damaged_text(damaged))
        where, needed = self._needs(job)
        free = self._free(where)
        if free < needed:
            self._waiting = (where, needed)  # no other job starts before this one has room
            return self._say(disk_full_text(self._disk(where), free, needed))
        if job is not None:
            self._waiting, self._free_at_start = None, free
        return self._say("")

    def failed(self, job: Slide | Case | None, exc: BaseException) -> str:
        """Why ``job`` failed through no fault of its own ("" when it may have): the
        bundle's files (checked in full) or a full disk. It goes back to the queue."""
        if isinstance(exc, ScanError):
            return ""
        damaged = self.bundle_problem(True) if self.bundle_problem else ""
        if damaged:
            return self._say(damaged_text(damaged))
        if not is_disk_full(exc):
            return ""
        if isinstance(job, Slide):
            more = self._free_at_start * 3 // 2 - STORE_MARGIN_BYTES
            self._estimates[job.path] = max(self._estimates.get(job.path, 0), more)
        where, needed = self._needs(job)
        self._waiting = (where, needed)
        return self._say(disk_full_text(self._disk(where), self._free(where), needed))

    def _needs(self, job: Slide | Case | None) -> tuple[Path, int]:
        if isinstance(job, Slide):
            if job.path not in self._estimates:
                self._estimates[job.path] = self.slide_needs(Path(job.path))
            return self.data_dir, STORE_MARGIN_BYTES + self._estimates[job.path]
        if isinstance(job, Case):
            return self.outbox, CASE_BASE_BYTES + RESULT_BYTES_PER_CELL * self.case_cells(job)
        return self._waiting or (self.data_dir, STORE_MARGIN_BYTES)

    def _free(self, where: Path) -> int:
        for folder in (where, *where.parents):  # the outbox may not exist yet
            if folder.exists():
                return self.free(folder)
        return self.free(where)

    def _disk(self, where: Path) -> str:
        """How the technician knows the disk: the data disk, or the outbox's own."""
        try:
            same = os.stat(where).st_dev == os.stat(self.data_dir).st_dev
        except OSError:
            same = where == self.data_dir
        return "data" if same else "outbox"

    def _say(self, reason: str) -> str:
        if reason != self.note.reason:
            if reason:
                log.warning("work held", extra={"reason": reason})
            else:
                log.info("work resumed", extra={"was": self.note.reason})
            try:
                self.note.say(reason)
            except OSError as exc:
                log.warning("could not write the pause note", extra={"error": str(exc)})
        return reason
