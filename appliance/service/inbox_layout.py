"""What in the inbox is a scan, which case it belongs to, and when it is complete.

Pure file-system logic, no threads and no store: the watcher drives it. What a
scan is (its format, its files, the cell-folder rules, its fingerprint) is the
readers' (``appliance.readers.formats`` and ``.members``); this module adds the
inbox's own concerns: cases, discovery and stability.

Layout rules (docs/service.md):
- ``inbox/<case>/...``: a subfolder is a case; its scans are its slides. A
  ``.ready`` file in it says the case is complete.
- ``inbox/<file>``: a loose file is a case of one, named after the file
  without its extension, unless ``watch.case_pattern`` (a regex with a named
  group ``case``) matches its name; then loose files group into that case
  (``inbox/<case>.ready`` marks it complete).
- Multi-file scans are one unit: ``X.mrxs`` with its folder ``X/``, a DICOM
  WSI folder (``*.dcm`` files), a single-cell folder (crops of at most
  ``formats.MAX_CELL_SIDE`` px a side) or a field folder (photos of one smear,
  larger than that or listed as fields by its manifest;
  ``appliance.readers.members.folder_layout`` tells them apart), an image with
  its pixel-size sidecar ``<file>.json``. A cell or field folder at the top of
  the inbox is a case of one; inside a case folder it is one of its slides. It
  is complete once it holds ``.ready`` or its manifest (``folder_complete``):
  the inbox's own rule, for folders still being copied into it; the readers
  open a folder as it is.
- Temporary names (``.part``, ``.tmp``, ``~$...``, hidden files) are ignored
  until renamed; symlinks that lead out of the inbox are never followed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.readers import formats, pixel_size
from appliance.readers.formats import MANIFEST_FILE, READY_FILE, Layout
from appliance.readers.members import (
    ScanMembers,
    data_folder,
    folder_layout,
    is_ignored_name,
    scan_members,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One scan: what the pipeline is given, and what the service watches."""

    path: Path  # the file or folder handed to the pipeline (a DICOM WSI: one of its files)
    case_key: str
    single: bool  # a case of one: scored as soon as its slide is finished
    kind: Layout  # file | mrxs | dicom | cells | fields
    case_dir: Path | None = None  # the case folder, where `.ready` lives
    extras: tuple[Path, ...] = ()  # companion files (sidecar) that belong to the scan

    @property
    def members(self) -> ScanMembers:
        return ScanMembers(self.path, self.kind, self.extras)

    @property
    def supported(self) -> bool:
        return self.kind != Layout.FILE or formats.format_for_extension(self.path) is not None

    @property
    def unsupported_reason(self) -> str:
        return formats.unsupported_reason(self.path)


@dataclass
class Discovery:
    units: list[Unit] = field(default_factory=list)
    ready_cases: set[str] = field(default_factory=set)


def case_for_loose(name: str, pattern: re.Pattern[str] | None) -> tuple[str, bool]:
    """(case key, single) for a loose file in the inbox."""
    if pattern is not None:
        match = pattern.fullmatch(name) or pattern.search(name)
        if match and match.groupdict().get("case"):
            return match.group("case"), False
    stem = Path(name).stem
    if stem.lower().endswith(".ome"):
        stem = stem[: -len(".ome")]
    return stem or name, True


def compile_case_pattern(text: str) -> re.Pattern[str] | None:
    """The configured grouping pattern, or None; a bad one raises ValueError."""
    if not text:
        return None
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise ValueError(f"watch.case_pattern is not a valid regex: {exc}") from None
    if "case" not in pattern.groupindex:
        raise ValueError("watch.case_pattern needs a named group (?P<case>...)")
    return pattern


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def _entries(folder: Path, root: Path) -> Iterator[os.DirEntry[str]]:
    """Visible entries of a folder; symlinks only when they stay inside the inbox."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if is_ignored_name(entry.name):
            continue
        if entry.is_symlink() and not _inside(Path(entry.path), root):
            log.debug("symlink out of the inbox ignored", extra={"path": entry.path})
            continue
        yield entry


def _units_in(
    folder: Path, root: Path, case_key: str | None, pattern: re.Pattern[str] | None
) -> Iterator[Unit]:
    """Units directly in ``folder``: the inbox itself (case_key None) or a case folder."""
    entries = list(_entries(folder, root))
    names = {e.name for e in entries}
    with_data_folder = {
        data_folder(Path(entry.path)).name
        for entry in entries
        if formats.layout_for_extension(Path(entry.path)) is Layout.FILE_WITH_DATA_FOLDER
    }
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            if entry.name in with_data_folder:
                continue  # the data folder of X.mrxs: part of that unit
            kind = folder_layout(path, [Path(e.path) for e in _entries(path, root)])
            if kind is None:
                if case_key is None:
                    continue  # a case folder: handled by discover()
                log.debug("nested folder ignored", extra={"path": str(path)})
                continue
            key, single = (entry.name, True) if case_key is None else (case_key, False)
            if kind is Layout.FOLDER_OF_FILES:
                members = scan_members(path)  # the reader opens it through one of its files
                yield Unit(members.path, key, single, kind, folder, members.extras)
            else:
                # At the top of the inbox the folder is its own case (its `.ready` is the
                # case's); inside a case folder the case's `.ready` is beside it.
                yield Unit(path, key, single, kind, path if case_key is None else folder)
            continue
        if not entry.is_file() or entry.name.lower().endswith(pixel_size.SIDECAR_SUFFIX):
            continue
        if case_key is None:
            key, single = case_for_loose(entry.name, pattern)
            case_dir = None
        else:
            key, single, case_dir = case_key, False, folder
        sidecar = pixel_size.sidecar_path(path)
        extras = (sidecar,) if sidecar.name in names else ()
        kind = Layout.FILE
        if formats.layout_for_extension(path) is Layout.FILE_WITH_DATA_FOLDER:
            # Its data folder belongs to it even before the scanner has written it.
            kind = Layout.FILE_WITH_DATA_FOLDER
            extras = (*extras, data_folder(path))
        yield Unit(path, key, single, kind, case_dir, extras)


def folder_complete(folder: Path) -> bool:
    """A cell or field folder in the inbox is copied in full once it holds ``.ready`` or
    its manifest (a technician adds one when the last image is in)."""
    return (folder / READY_FILE).is_file() or (folder / MANIFEST_FILE).is_file()


def scans_at(path: Path) -> list[Path]:
    """The scans a path names, as the pipeline takes them: a file, a cell folder, a
    field folder or a DICOM WSI folder is one scan; any other folder is a case folder,
    whose scans are those the inbox would find in it (a cases table's ``scans`` column)."""
    if not path.is_dir():
        return [path]
    root = path.resolve()
    kind = folder_layout(path, [Path(e.path) for e in _entries(path, root)])
    if kind is Layout.FOLDER_OF_FILES:
        return [scan_members(path).path]
    if kind is not None:
        return [path]
    return [unit.path for unit in _units_in(path, root, path.name, None)]


def discover(inbox: Path, pattern: re.Pattern[str] | None = None) -> Discovery:
    """Every unit in the inbox and the cases marked complete; touches nothing."""
    root = inbox.resolve()
    found = Discovery()
    for unit in _units_in(inbox, root, None, pattern):
        found.units.append(unit)
    for entry in _entries(inbox, root):
        path = Path(entry.path)
        if not entry.is_dir() or any(u.path == path or path in u.extras for u in found.units):
            continue
        found.units.extend(_units_in(path, root, entry.name, pattern))
        if (path / READY_FILE).is_file():
            found.ready_cases.add(entry.name)
    # `<case>.ready` beside loose files grouped by the pattern.
    try:
        for name in os.listdir(inbox):
            if name.endswith(READY_FILE) and name != READY_FILE:
                found.ready_cases.add(name[: -len(READY_FILE)])
    except OSError:
        pass
    return found


@dataclass(frozen=True)
class Signature:
    """What changes while a scan is being written: file count, bytes, newest mtime."""

    files: int
    size: int
    mtime_ns: int

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9


def signature(unit: Unit) -> Signature | None:
    """The unit's current signature, or None when it has vanished."""
    if not unit.path.exists():
        return None
    size = mtime = count = 0
    for path in unit.members.files():
        try:
            st = path.stat()
        except OSError:
            continue  # vanished between listing and stat: the next look decides
        count += 1
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return Signature(count, size, mtime)


class StabilityTracker:
    """Remembers each unit's last signature and when it last changed."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[Signature, float]] = {}

    def observe(self, path: Path, sig: Signature, now: float) -> float:
        """Record an observation; returns for how long the signature has been unchanged."""
        previous = self._seen.get(path)
        if previous is None or previous[0] != sig:
            self._seen[path] = (sig, now)
            return 0.0
        return now - previous[1]

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)
