"""The files that make up one scan, and its content fingerprint.

A scan is more than the path handed over when its layout says so
(``formats.Layout``): a file's pixel-size sidecar ``<file>.json``, the data
folder of ``X.mrxs``, every file of a DICOM WSI folder, the files of a cell or
field folder (with its ``.ready``, manifest and sidecars). The fingerprint
hashes all of them, so the service (whose inbox units are built from the same
rules) and ``cytoedge score`` give a scan the same slide-cache entry.

What a folder is (``folder_layout``) is decided here for the inbox and the
pipeline alike: DICOM files make a DICOM WSI; a manifest listing ``cells`` or
``fields`` says so; otherwise the first image whose header reads decides: a
crop of at most ``formats.MAX_CELL_SIDE`` px a side makes a cell folder, a
larger photo a field folder. A folder holding subfolders, or slide scans of
other formats, is neither: it is a case folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import formats, pixel_size
from .field_folder import is_field_file
from .formats import MANIFEST_FILE, Layout

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
                        or (self.layout.is_folder_of_images and n == formats.READY_FILE)
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


def _manifest_lists(folder: Path) -> Layout | None:
    """The layout a folder's manifest names by what it lists (``cells`` or ``fields``)."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the folder's reader says what is wrong with it
    if isinstance(data, dict) and "cells" in data:
        return Layout.CELL_FOLDER
    if isinstance(data, dict) and "fields" in data:
        return Layout.FIELD_FOLDER
    return None


def folder_layout(folder: Path, entries: Iterable[Path] | None = None) -> Layout | None:
    """What ``folder`` is (module docstring): a DICOM WSI, a cell or field folder, or
    None for a case folder. ``entries``: its visible entries, when the caller has
    filtered them already (the inbox leaves out links that lead outside it)."""
    if entries is None:
        try:
            entries = [p for p in folder.iterdir() if not is_ignored_name(p.name)]
        except OSError:
            return None
    paths = sorted(entries)
    files = [p for p in paths if p.is_file()]
    if any(formats.layout_for_extension(p) is Layout.FOLDER_OF_FILES for p in files):
        return Layout.FOLDER_OF_FILES
    has_manifest = (folder / MANIFEST_FILE).is_file()
    listed = _manifest_lists(folder) if has_manifest else None
    if listed is not None:
        return listed
    images = formats.CELL_EXTENSIONS | formats.FIELD_EXTENSIONS
    if any(p.is_dir() for p in paths) or any(
        p.suffix.lower() in formats.SCAN_EXTENSIONS - images for p in files
    ):
        return None  # subfolders or slide scans: a case folder
    for path in files:
        if path.suffix.lower() not in images:
            continue
        size = formats.image_size(path)
        photo = is_field_file(path)
        if size is None and not photo:
            continue  # still being written, or damaged: the next image decides
        if not photo:
            return None  # a tiled slide scan: its folder is a case
        crop = size is not None and formats.fits_a_cell(size)
        return Layout.CELL_FOLDER if crop else Layout.FIELD_FOLDER
    # Nothing readable yet: a manifest still makes it a cell folder (its reader explains).
    return Layout.CELL_FOLDER if has_manifest else None


def scan_members(path: Path | str) -> ScanMembers:
    """The members of the scan at ``path`` (a file, a DICOM WSI folder or one of its
    files, a single-cell or field folder), as the inbox watcher finds them."""
    path = Path(path)
    if path.is_dir():
        layout = folder_layout(path)
        if layout is Layout.FOLDER_OF_FILES:
            folder_files = sorted(
                p
                for p in path.iterdir()
                if p.is_file()
                and not is_ignored_name(p.name)
                and formats.layout_for_extension(p) is Layout.FOLDER_OF_FILES
            )
            # OpenSlide opens a DICOM WSI through any one of its files.
            return ScanMembers(folder_files[0], Layout.FOLDER_OF_FILES, (path,))
        return ScanMembers(path, layout or Layout.CELL_FOLDER)
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
