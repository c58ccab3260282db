"""The one table of what cytoedge reads: scan formats, folders of single cells and
folders of microscope field photos.

The readers (``open_scan``, ``open_cell_folder``), the inbox watcher
(``appliance.service.inbox_layout``) and ``cytoedge doctor`` all read this table, so
what the inbox accepts is exactly what the readers open and what doctor lists.
A format is added here or nowhere, and only once a real file of it has been
through the appliance end to end (Zeiss CZI is not here yet: OpenSlide 4 has a
reader for it, but no CZI scan has been tested).

A scan's format is decided by its leading bytes (``sniff``), not by its
extension alone; only formats without a signature of their own (multi-file or
text-headed ones such as MIRAX, whose index file is no image) are known by
their extension.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from PIL import Image


class Reader(StrEnum):
    """The library that opens a format."""

    OPENSLIDE = "OpenSlide"
    TIFFFILE = "tifffile"
    PILLOW = "Pillow"
    CELL_FOLDER = "cell folder"
    FIELD_FOLDER = "field folder (each photo: Pillow or tifffile)"


class Layout(StrEnum):
    """How a scan's files lie. The values are the inbox units' ``kind``."""

    FILE = "file"  # one file (its pixel-size sidecar ``<file>.json`` goes with it)
    FILE_WITH_DATA_FOLDER = "mrxs"  # ``X.mrxs`` and its data folder ``X/``
    FOLDER_OF_FILES = "dicom"  # a folder of the scan's files (DICOM WSI: one per level)
    CELL_FOLDER = "cells"  # a folder of single-cell crops
    FIELD_FOLDER = "fields"  # a folder of microscope field photos of one smear

    @property
    def description(self) -> str:
        return {
            Layout.FILE: "one file (with its pixel-size sidecar, if any)",
            Layout.FILE_WITH_DATA_FOLDER: "a file and its data folder of the same name",
            Layout.FOLDER_OF_FILES: "a folder of its files",
            Layout.CELL_FOLDER: (
                f"a folder of crops of at most {MAX_CELL_SIDE} px a side (in the inbox: "
                f"complete with {READY_FILE} or {MANIFEST_FILE})"
            ),
            Layout.FIELD_FOLDER: (
                f"a folder of photos of one smear, larger than {MAX_CELL_SIDE} px a side or "
                f'listed as "fields" in its {MANIFEST_FILE} (in the inbox: complete with '
                f"{READY_FILE} or {MANIFEST_FILE})"
            ),
        }[self]

    @property
    def is_folder_of_images(self) -> bool:
        """A folder the technician fills image by image: complete once it says so."""
        return self in (Layout.CELL_FOLDER, Layout.FIELD_FOLDER)


@dataclass(frozen=True)
class Magic:
    """Bytes a format's files hold at ``offset``."""

    offset: int
    value: bytes

    def matches(self, head: bytes) -> bool:
        return head[self.offset : self.offset + len(self.value)] == self.value


@dataclass(frozen=True)
class Format:
    """One format the appliance reads."""

    name: str  # as shown to people
    extensions: tuple[str, ...]  # lower case, with the dot; a folder's: of its files
    magic: tuple[Magic, ...]  # any one identifies the format; none: known by extension
    readers: tuple[Reader, ...]  # tried in this order
    layout: Layout


_TIFF = (
    Magic(0, b"II*\x00"),
    Magic(0, b"MM\x00*"),
    Magic(0, b"II+\x00"),  # BigTIFF
    Magic(0, b"MM\x00+"),
)
# OpenSlide reads what it recognises; tifffile reads the TIFFs it does not (OME-TIFF
# with a sub-IFD pyramid, untiled fields) and those it recognises but cannot open.
_SLIDE_TIFF = (Reader.OPENSLIDE, Reader.TIFFFILE)

FORMATS: tuple[Format, ...] = (
    # The generic entry first: a TIFF whose extension names no TIFF-based format is this one.
    Format(
        "TIFF (tiled pyramid, Philips, Trestle, OME-TIFF, single field)",
        (".tif", ".tiff"),
        _TIFF,
        _SLIDE_TIFF,
        Layout.FILE,
    ),
    Format("Aperio SVS", (".svs",), _TIFF, _SLIDE_TIFF, Layout.FILE),
    Format("Hamamatsu NDPI", (".ndpi",), _TIFF, _SLIDE_TIFF, Layout.FILE),
    Format("Hamamatsu VMS / VMU", (".vms", ".vmu"), (), (Reader.OPENSLIDE,), Layout.FILE),
    Format("Leica SCN", (".scn",), _TIFF, _SLIDE_TIFF, Layout.FILE),
    Format("Ventana BIF", (".bif",), _TIFF, _SLIDE_TIFF, Layout.FILE),
    Format("Sakura SVSlide", (".svslide",), (), (Reader.OPENSLIDE,), Layout.FILE),
    Format("MIRAX", (".mrxs",), (), (Reader.OPENSLIDE,), Layout.FILE_WITH_DATA_FOLDER),
    Format(
        "DICOM WSI", (".dcm",), (Magic(128, b"DICM"),), (Reader.OPENSLIDE,), Layout.FOLDER_OF_FILES
    ),
    Format(
        "JPEG field", (".jpg", ".jpeg"), (Magic(0, b"\xff\xd8\xff"),), (Reader.PILLOW,), Layout.FILE
    ),
    Format(
        "PNG field", (".png",), (Magic(0, b"\x89PNG\r\n\x1a\n"),), (Reader.PILLOW,), Layout.FILE
    ),
    Format("BMP field", (".bmp",), (Magic(0, b"BM"),), (Reader.PILLOW,), Layout.FILE),
    Format(
        "folder of single-cell images",
        (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"),
        (),
        (Reader.CELL_FOLDER,),
        Layout.CELL_FOLDER,
    ),
    Format(
        "folder of microscope field photos",
        (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"),
        (),
        (Reader.FIELD_FOLDER,),
        Layout.FIELD_FOLDER,
    ),
)

SCAN_FORMATS = tuple(f for f in FORMATS if not f.layout.is_folder_of_images)
CELL_FORMAT = next(f for f in FORMATS if f.layout is Layout.CELL_FOLDER)
FIELD_FORMAT = next(f for f in FORMATS if f.layout is Layout.FIELD_FOLDER)
SCAN_EXTENSIONS = frozenset(ext for f in SCAN_FORMATS for ext in f.extensions)
CELL_EXTENSIONS = frozenset(CELL_FORMAT.extensions)
FIELD_EXTENSIONS = frozenset(FIELD_FORMAT.extensions)
_SNIFF_BYTES = max(m.offset + len(m.value) for f in FORMATS for m in f.magic)

# A single-cell crop is small: a leukocyte is 7-20 um across, about 80 px at
# 0.25 um/px, and exports such as Metafer's are 144 px. 512 px a side leaves room
# for wide margins and finer scanners, yet stays below a microscope field (a
# camera frame is 640 px or more, a slide tile 800 px), so a field in a case
# folder is not taken for a cell. It decides only what a folder's manifest does
# not say: tiles of 512 px listed as "fields" are fields. The inbox and the
# cell-folder reader share it.
MAX_CELL_SIDE = 512
# A field photo must hold a white cell (10-20 um) and the crop the pipeline takes
# around it: 128 px at the 0.25 um/px working grid.
MIN_FIELD_UM = 32.0
# A folder of cells or fields says its writer is done with one of these (the inbox
# waits for it; a folder named on the command line or in a cases table is at rest).
READY_FILE = ".ready"
MANIFEST_FILE = "manifest.json"


def format_for_extension(path: Path) -> Format | None:
    """The scan format a file's extension names, or None."""
    suffix = path.suffix.lower()
    return next((f for f in SCAN_FORMATS if suffix in f.extensions), None)


def layout_for_extension(path: Path) -> Layout | None:
    """The layout of the scan format a file's extension names, or None."""
    named = format_for_extension(path)
    return named.layout if named is not None else None


def unsupported_reason(path: Path) -> str:
    """Why a file whose extension is in no format is refused (the inbox and the readers)."""
    suffix = path.suffix.lower() or "(none)"
    allowed = " ".join(sorted(SCAN_EXTENSIONS))
    return f"unsupported file type {suffix}: not a slide scan (supported: {allowed})"


def sniff(path: Path) -> Format | None:
    """The scan format of a file by its leading bytes; None when they match none.

    Formats without a signature are known by their extension. When several
    formats share a signature (the TIFF-based ones), the extension picks among
    them, else the first in ``FORMATS``.
    """
    named = format_for_extension(path)
    if named is not None and not named.magic:
        return named
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    matching = [f for f in SCAN_FORMATS if any(m.matches(head) for m in f.magic)]
    if named in matching:
        return named
    return matching[0] if matching else None


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding; None if unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def fits_a_cell(size: tuple[int, int]) -> bool:
    return max(size) <= MAX_CELL_SIDE
