"""Reading scans: one entry point for every format, typed errors for every bad input.

``open_scan(path, pixel_size_um=cfg.scan.pixel_size_um) -> Scan`` picks the reader:

* OpenSlide for what it recognises (SVS, NDPI, MRXS, SCN, DICOM WSI, BIF, generic
  tiled TIFF, ...);
* tifffile for other TIFFs (OME-TIFF with sub-IFD pyramids, untiled fields), also
  when OpenSlide recognises a TIFF but fails to open it;
* Pillow for single fields (PNG, JPEG, BMP).

The format is decided by the file's leading bytes, never by its extension alone.
Every failure is a ``ScanError`` subclass with a one-line ``reason`` written for
a technician; a library's own exception text never becomes one.
``probe(path)`` is the cheap "does it open cleanly" check the service runs before
queuing a file (headers, pixel size, a thumbnail, one full-resolution tile);
``open_cell_folder(folder)`` reads the peripheral-blood folders of single cells.
"""

from __future__ import annotations

from pathlib import Path

import tifffile

from . import openslide_scan
from .base import TARGET_UM_PER_PX, Level, Scan, ScanInfo, check_brightfield
from .cell_folder import CellFolder, is_complete, open_cell_folder
from .errors import (
    BlankScanError,
    CellFolderError,
    EmptyFileError,
    ImageTooLargeError,
    NotAnImageError,
    NotBrightfieldError,
    PixelSizeError,
    ScanError,
    ScanNotFoundError,
    UnreadableScanError,
    UnsupportedScanError,
    fails_as,
)
from .image_scan import ImageScan
from .tiff_scan import TiffScan

__all__ = [
    "TARGET_UM_PER_PX",
    "BlankScanError",
    "CellFolder",
    "CellFolderError",
    "EmptyFileError",
    "ImageTooLargeError",
    "Level",
    "NotAnImageError",
    "NotBrightfieldError",
    "PixelSizeError",
    "Scan",
    "ScanError",
    "ScanInfo",
    "ScanNotFoundError",
    "UnreadableScanError",
    "UnsupportedScanError",
    "is_complete",
    "open_cell_folder",
    "open_scan",
    "probe",
]

# Extensions of multi-file or text-headed slide formats whose first bytes are not an image magic.
_OPENSLIDE_ONLY = {".mrxs", ".vms", ".vmu", ".svslide"}
_THUMBNAIL_UM = 16.0  # coarse enough to be cheap, fine enough to see cells as colour
# The last word on a file that fails in a way no reader foresaw.
_UNREADABLE = (
    "the file cannot be read: its contents are damaged or not laid out as its format requires"
)


def _sniff(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(132)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM":
        return "bmp"
    return "unknown"


def _is_ome(path: Path) -> bool:
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # not parseable here is not OME; OpenSlide's open decides
        return False


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ScanNotFoundError(path, "file not found: it was moved or deleted")
    if not path.is_file():
        raise ScanNotFoundError(path, "not a regular file (a folder or a device)")
    if path.stat().st_size == 0:
        raise EmptyFileError(path, "empty file (0 bytes): still being copied or a failed transfer")


def _open_unchecked(path: Path, pixel_size_um: float) -> Scan:
    kind = _sniff(path)
    if kind in ("tiff", "dicom") or path.suffix.lower() in _OPENSLIDE_ONLY:
        vendor = openslide_scan.detect(path)
        if vendor == "generic-tiff" and _is_ome(path):
            vendor = None  # OpenSlide ignores OME's sub-IFD pyramid and PhysicalSizeX
        if vendor is not None:
            try:
                return openslide_scan.OpenSlideScan(path, vendor, pixel_size_um)
            except UnreadableScanError:
                if kind != "tiff":
                    raise
                # OpenSlide knows the TIFF but cannot open it: tifffile may still read it.
        if kind == "tiff":
            return TiffScan(path, pixel_size_um)
        raise UnreadableScanError(
            path,
            f"the slide reader does not recognise this {path.suffix.lower()} file: it is damaged, "
            "incomplete, or from a scanner model that is not supported",
        )
    if kind in ("jpeg", "png", "bmp"):
        return ImageScan(path, pixel_size_um)
    raise NotAnImageError(
        path,
        f"not an image: the contents of this {path.suffix.lower()} file match no scan format "
        "(a document, or the start of the file is damaged)",
    )


def open_scan(path: Path | str, pixel_size_um: float = 0.0) -> Scan:
    """Open a scan file for region reading at 0.25 um/px.

    ``pixel_size_um`` is the configured fallback (``scan.pixel_size_um``; 0 = none).
    Besides opening, checks that the image is a brightfield colour stain on a
    coarse thumbnail. Raises a ``ScanError`` subclass on any bad input.
    """
    path = Path(path)
    with fails_as(UnreadableScanError, path, _UNREADABLE):
        _check_file(path)
        scan = _open_unchecked(path, pixel_size_um)
    try:
        with fails_as(UnreadableScanError, path, _UNREADABLE):
            check_brightfield(path, scan.thumbnail(max(_THUMBNAIL_UM, TARGET_UM_PER_PX)))
    except BaseException:
        scan.close()
        raise
    return scan


def probe(path: Path | str, pixel_size_um: float = 0.0) -> ScanInfo:
    """Check that a scan (or a cell folder) opens cleanly; returns what it is.

    Reads headers, the pixel size, a coarse thumbnail and one full-resolution
    tile from the middle, so that a truncated file fails here, before queuing.
    """
    path = Path(path)
    if path.is_dir():
        folder = open_cell_folder(path)
        cell = folder.read(0)
        return ScanInfo(
            path=str(path),
            format="cells",
            bytes=sum(p.stat().st_size for p in folder.image_paths),
            width=len(folder),
            height=1,
            native_width=cell.shape[1],
            native_height=cell.shape[0],
            pixel_size_um=folder.pixel_size_um or pixel_size_um or TARGET_UM_PER_PX,
            pixel_size_source="metadata" if folder.pixel_size_um else "config",
            level_count=1,
        )
    with open_scan(path, pixel_size_um) as scan:
        side = min(512, scan.width, scan.height)
        scan.read_region((scan.width - side) // 2, (scan.height - side) // 2, side, side)
        return scan.info()
