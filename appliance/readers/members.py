"""The files that make up one scan, and its content fingerprint.

A scan is more than the path handed over when its layout says so
(``formats.Layout``): a file's pixel-size sidecar ``<file>.json``, the data
folder of ``X.mrxs``, every file of a DICOM WSI folder, the files of a cell
folder (with its ``.ready``). The fingerprint hashes all of them, so the
service (whose inbox units are built from the same rules) and ``cytoedge
score`` give a scan the same slide-cache entry.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from . import formats, pixel_size
from .formats import Layout

# Names copy tools and scanners use while writing: never part of a scan until renamed.
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", ".download")
_HASH_CHUNK = 4 * 1024 * 1024


def is_ignored_name(name: str) -> bool:
    """Files being written under a temporary name, and hidden files."""
    return name.startswith((".", "~$")) or name.lower().endswith(TEMP_SUFFIXES)


def data_folder(path: Path) -> Path:
    """The data folder of a file whose layout has one (``X.mrxs`` -> ``X/``)."""
    return path.with_name(path.stem)


@dataclass(frozen=True)
class ScanMembers:
    """One scan's files: ``path`` is what the reader opens (a DICOM WSI: one of its files)."""

    path: Path
    layout: Layout
    extras: tuple[Path, ...] = ()  # its sidecar, the MRXS data folder, the DICOM folder

    def files(self) -> list[Path]:
        """Every file of the scan, sorted."""
        files: list[Path] = []
        for root in (self.path, *self.extras):
            if root.is_dir() and not root.is_symlink():
                for dirpath, dirnames, filenames in os.walk(root):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    files.extend(
                        Path(dirpath) / n
                        for n in filenames
                        if not is_ignored_name(n)
                        or (self.layout is Layout.CELL_FOLDER and n == formats.READY_FILE)
                    )
            elif root.exists():
                files.append(root)
        return sorted(set(files))

    def fingerprint(self) -> str:
        """sha256 of the content, so that a copy or a renamed scan has the fingerprint of
        the original. A single file's is the plain sha256 of its bytes; for several
        files the member names, relative to the scan, are hashed too."""
        digest = hashlib.sha256()
        files = self.files()
        for path in files:
            if len(files) > 1:
                digest.update(f"\0{self._member_name(path)}\0".encode())
            with open(path, "rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()

    def _member_name(self, path: Path) -> str:
        if self.path.is_dir():
            return path.relative_to(self.path).as_posix()
        relative = path.relative_to(self.path.parent).as_posix()
        # X.mrxs + X/...: the scan's own name is not content, a renamed scan is the same scan.
        stem = self.path.stem
        return "@" + relative[len(stem) :] if relative.startswith(stem) else relative


def scan_members(path: Path | str) -> ScanMembers:
    """The members of the scan at ``path`` (a file, a DICOM WSI folder or one of its
    files, or a single-cell folder), as the inbox watcher finds them."""
    path = Path(path)
    if path.is_dir():
        folder_files = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and not is_ignored_name(p.name)
            and formats.layout_for_extension(p) is Layout.FOLDER_OF_FILES
        )
        if folder_files:
            # OpenSlide opens a DICOM WSI through any one of its files.
            return ScanMembers(folder_files[0], Layout.FOLDER_OF_FILES, (path,))
        return ScanMembers(path, Layout.CELL_FOLDER)
    layout = formats.layout_for_extension(path)
    if layout is Layout.FOLDER_OF_FILES:
        return scan_members(path.parent)
    sidecar = pixel_size.sidecar_path(path)
    extras = (sidecar,) if sidecar.is_file() else ()
    if layout is Layout.FILE_WITH_DATA_FOLDER and data_folder(path).is_dir():
        return ScanMembers(path, layout, (*extras, data_folder(path)))
    return ScanMembers(path, Layout.FILE, extras)


def scan_fingerprint(path: Path | str) -> str:
    """The content fingerprint of the scan at ``path`` (see ``scan_members``)."""
    return scan_members(path).fingerprint()
