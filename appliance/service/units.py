"""What in the inbox is a scan, which case it belongs to, and when it is complete.

Pure file-system logic, no threads and no store: the watcher drives it.

Layout rules (docs/service.md):
- ``inbox/<case>/...``: a subfolder is a case; its scans are its slides. A
  ``.ready`` file in it says the case is complete.
- ``inbox/<file>``: a loose file is a case of one, named after the file
  without its extension, unless ``watch.case_pattern`` (a regex with a named
  group ``case``) matches its name; then loose files group into that case
  (``inbox/<case>.ready`` marks it complete).
- Multi-file scans are one unit: ``X.mrxs`` with its folder ``X/``, a DICOM
  WSI folder (``*.dcm`` files), a single-cell folder (``manifest.json``, or
  small crops; complete once it holds ``.ready`` or the manifest), an image
  with its pixel-size sidecar ``<file>.json``.
- Temporary names (``.part``, ``.tmp``, ``~$...``, hidden files) are ignored
  until renamed; symlinks that lead out of the inbox are never followed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

READY_FILE = ".ready"
MANIFEST_FILE = "manifest.json"
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", ".download")
# Files that accompany a scan and are never a scan themselves.
SIDECAR_SUFFIXES = (".json",)
SLIDE_EXTENSIONS = frozenset(
    {
        ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
        ".bif", ".dcm", ".png", ".jpg", ".jpeg", ".bmp",
    }
)  # fmt: skip
CELL_EXTENSIONS = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"})
# A crop this small is a single cell, never a slide (a slide QC tile alone is 800 px).
MAX_CELL_SIDE = 512
_HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Unit:
    """One scan: what the pipeline is given, and what the service watches."""

    path: Path  # the file or folder handed to the pipeline (a DICOM WSI: one of its files)
    case_key: str
    single: bool  # a case of one: scored as soon as its slide is finished
    kind: str  # file | mrxs | dicom | cells
    case_dir: Path | None = None  # the case folder, where `.ready` lives
    extras: tuple[Path, ...] = ()  # companion files (sidecar) that belong to the scan

    @property
    def supported(self) -> bool:
        return self.kind != "file" or self.path.suffix.lower() in SLIDE_EXTENSIONS

    @property
    def unsupported_reason(self) -> str:
        allowed = " ".join(sorted(SLIDE_EXTENSIONS))
        suffix = self.path.suffix.lower() or "(none)"
        return f"unsupported file type {suffix}: not a slide scan (supported: {allowed})"


@dataclass
class Discovery:
    units: list[Unit] = field(default_factory=list)
    ready_cases: set[str] = field(default_factory=set)


def is_ignored_name(name: str) -> bool:
    """Names scanners and copy tools use while writing, and hidden files."""
    lower = name.lower()
    return name.startswith((".", "~$")) or lower.endswith(TEMP_SUFFIXES)


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


def _is_dicom_folder(folder: Path, root: Path) -> bool:
    return any(e.is_file() and e.name.lower().endswith(".dcm") for e in _entries(folder, root))


def _is_cell_folder(folder: Path, root: Path) -> bool:
    """A manifest, or image files that are single-cell crops (decided by the first
    image whose header reads; one still being written or deleted is skipped)."""
    if (folder / MANIFEST_FILE).is_file():
        return True
    for entry in _entries(folder, root):
        if entry.is_file() and Path(entry.name).suffix.lower() in CELL_EXTENSIONS:
            try:
                with Image.open(entry.path) as image:  # reads the header only
                    return max(image.size) <= MAX_CELL_SIDE
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
    return False


def _units_in(
    folder: Path, root: Path, case_key: str | None, pattern: re.Pattern[str] | None
) -> Iterator[Unit]:
    """Units directly in ``folder``: the inbox itself (case_key None) or a case folder."""
    entries = list(_entries(folder, root))
    names = {e.name for e in entries}
    mrxs_stems = {Path(n).stem for n in names if n.lower().endswith(".mrxs")}
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            if entry.name in mrxs_stems:
                continue  # the data folder of X.mrxs: part of that unit
            if _is_dicom_folder(path, root):
                kind = "dicom"
            elif _is_cell_folder(path, root):
                kind = "cells"
            else:
                if case_key is None:
                    continue  # a case folder: handled by discover()
                log.debug("nested folder ignored", extra={"path": str(path)})
                continue
            key, single = (entry.name, True) if case_key is None else (case_key, False)
            if kind == "dicom":
                # OpenSlide opens a DICOM WSI through any one of its files.
                first = min(e.path for e in _entries(path, root) if e.name.lower().endswith(".dcm"))
                yield Unit(Path(first), key, single, kind, folder, (path,))
            else:
                yield Unit(path, key, single, kind, path)
            continue
        if not entry.is_file() or entry.name.lower().endswith(SIDECAR_SUFFIXES):
            continue
        if case_key is None:
            key, single = case_for_loose(entry.name, pattern)
            case_dir = None
        else:
            key, single, case_dir = case_key, False, folder
        sidecar = path.with_name(path.name + ".json")
        extras = (sidecar,) if sidecar.name in names else ()
        kind = "mrxs" if path.stem in mrxs_stems and path.suffix.lower() == ".mrxs" else "file"
        if kind == "mrxs":
            extras = (*extras, path.with_name(path.stem))
        yield Unit(path, key, single, kind, case_dir, extras)


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


def unit_files(unit: Unit) -> list[Path]:
    """Every file that makes up the unit, sorted (for its signature and fingerprint)."""
    roots = [unit.path, *unit.extras] if unit.kind != "cells" else [unit.path]
    files: list[Path] = []
    for root in roots:
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files.extend(
                    Path(dirpath) / n
                    for n in filenames
                    if not is_ignored_name(n) or (unit.kind == "cells" and n == READY_FILE)
                )
        elif root.exists():
            files.append(root)
    return sorted(set(files))


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
    for path in unit_files(unit):
        try:
            st = path.stat()
        except OSError:
            continue  # vanished between listing and stat: the next look decides
        count += 1
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return Signature(count, size, mtime)


def fingerprint(unit: Unit) -> str:
    """sha256 of the content, so a copy or a renamed scan has the fingerprint of the
    original. A single file's fingerprint is the plain sha256 of its bytes; for
    multi-file units the member names, relative to the unit, are hashed too."""
    digest = hashlib.sha256()
    files = unit_files(unit)
    for path in files:
        if len(files) > 1:
            digest.update(f"\0{_member_name(unit, path)}\0".encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def unit_for(path: Path) -> Unit:
    """The unit a scan handed over directly (``cytoedge score``) makes: the same
    members, hence the same fingerprint and slide-cache entry, as the watcher
    gives it in the inbox (its sidecar, an MRXS data folder, every file of a
    DICOM folder). A folder without ``.dcm`` files is a single-cell folder."""
    path = Path(path)
    if path.is_dir():
        dicom = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
        if dicom:
            return Unit(dicom[0], path.name, True, "dicom", path.parent, (path,))
        return Unit(path, path.name, True, "cells", path)
    key, _ = case_for_loose(path.name, None)
    if path.suffix.lower() == ".dcm":
        return unit_for(path.parent)
    sidecar = path.with_name(path.name + ".json")
    extras = (sidecar,) if sidecar.is_file() else ()
    if path.suffix.lower() == ".mrxs" and path.with_name(path.stem).is_dir():
        return Unit(path, key, True, "mrxs", None, (*extras, path.with_name(path.stem)))
    return Unit(path, key, True, "file", None, extras)


def scan_fingerprint(path: Path) -> str:
    """``fingerprint`` of the unit ``path`` makes (see ``unit_for``)."""
    return fingerprint(unit_for(path))


def _member_name(unit: Unit, path: Path) -> str:
    if unit.path.is_dir():
        return path.relative_to(unit.path).as_posix()
    relative = path.relative_to(unit.path.parent).as_posix()
    # X.mrxs + X/...: the scan's own name is not content, a renamed scan is the same scan.
    stem = unit.path.stem
    return "@" + relative[len(stem) :] if relative.startswith(stem) else relative


class StabilityTracker:
    """Remembers each unit's last signature and when it last changed."""

    def __init__(self, quiet_seconds: float) -> None:
        self.quiet_seconds = quiet_seconds
        self._seen: dict[Path, tuple[Signature, float]] = {}

    def observe(self, path: Path, sig: Signature, now: float) -> float:
        """Record an observation; returns for how long the signature has been unchanged."""
        previous = self._seen.get(path)
        if previous is None or previous[0] != sig:
            self._seen[path] = (sig, now)
            return 0.0
        return now - previous[1]

    def is_stable(self, path: Path, sig: Signature, now: float) -> bool:
        return self.observe(path, sig, now) >= self.quiet_seconds

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def __contains__(self, path: Path) -> bool:
        return path in self._seen
