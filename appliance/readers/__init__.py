"""Reading scans: one entry point for every format, typed errors for every bad input.

What is read, and by which library, is one table: ``formats.FORMATS`` (the
inbox watcher and ``cytoedge doctor`` use it too). ``open_scan(path,
calibration=cfg.calibration) -> Scan`` refuses an extension the table
does not hold, decides the format by the file's leading bytes (``formats.sniff``)
and tries that format's readers in order:

* OpenSlide for what it recognises (SVS, NDPI, MRXS, SCN, DICOM WSI, BIF, generic
  tiled TIFF, ...);
* tifffile for other TIFFs (OME-TIFF with sub-IFD pyramids, untiled fields), also
  when OpenSlide recognises a TIFF but fails to open it;
* Pillow for single fields (PNG, JPEG, BMP).

Every failure is a ``ScanError`` subclass with a one-line ``reason`` written for
a technician; a library's own exception text never becomes one.
``probe(path)`` is the cheap "does it open cleanly" check the service runs before
queuing a file (headers, pixel size, a thumbnail, one full-resolution tile);
``open_cell_folder(folder)`` reads the peripheral-blood folders of single cells,
``open_field_folder(folder)`` the folders of microscope field photos of one smear
(each field then opened with ``open_scan``; ``single_field`` makes one photo a folder
of one). ``scan_members`` / ``scan_fingerprint`` say which files make up a scan and
hash them, ``folder_layout`` what a folder is. The pixel size a file lacks comes from
a ``Calibration`` (``config.calibration``: ``scan.pixel_size_um``, ``scan.camera``,
``[cameras.<name>]``); a bare number is ``scan.pixel_size_um`` alone.
"""

from __future__ import annotations

from pathlib import Path

import tifffile

from . import formats, openslide_scan, pixel_size
from .base import TARGET_UM_PER_PX, Level, Scan, ScanInfo, check_brightfield
from .cell_folder import CellFolder, open_cell_folder
from .errors import (
    BlankScanError,
    CellFolderError,
    EmptyFileError,
    FieldFolderError,
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
from .field_folder import FieldFolder, is_field_file, open_field_folder, single_field
from .formats import Layout, Reader
from .image_scan import ImageScan
from .members import ScanMembers, folder_layout, scan_fingerprint, scan_members
from .pixel_size import Calibration
from .tiff_scan import TiffScan

__all__ = [
    "TARGET_UM_PER_PX",
    "BlankScanError",
    "Calibration",
    "CellFolder",
    "CellFolderError",
    "EmptyFileError",
    "FieldFolder",
    "FieldFolderError",
    "ImageTooLargeError",
    "Level",
    "NotAnImageError",
    "NotBrightfieldError",
    "PixelSizeError",
    "Scan",
    "ScanError",
    "ScanInfo",
    "ScanMembers",
    "ScanNotFoundError",
    "UnreadableScanError",
    "UnsupportedScanError",
    "folder_layout",
    "is_field_file",
    "open_cell_folder",
    "open_field_folder",
    "open_scan",
    "probe",
    "scan_fingerprint",
    "scan_members",
    "single_field",
]

_THUMBNAIL_UM = 16.0  # coarse enough to be cheap, fine enough to see cells as colour
# The last word on a file that fails in a way no reader foresaw.
_UNREADABLE = (
    "the file cannot be read: its contents are damaged or not laid out as its format requires"
)


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
    if formats.format_for_extension(path) is None:
        raise UnsupportedScanError(path, formats.unsupported_reason(path))
    if path.stat().st_size == 0:
        raise EmptyFileError(path, "empty file (0 bytes): still being copied or a failed transfer")


def _open_unchecked(path: Path, calibration: Calibration | float) -> Scan:
    fmt = formats.sniff(path)
    if fmt is None:
        raise NotAnImageError(
            path,
            f"not an image: the contents of this {path.suffix.lower()} file match no scan format "
            "(a document, or the start of the file is damaged)",
        )
    opened_but_damaged: UnreadableScanError | None = None
    for reader in fmt.readers:
        if reader is Reader.OPENSLIDE:
            vendor = openslide_scan.detect(path)
            if vendor == "generic-tiff" and _is_ome(path):
                vendor = None  # OpenSlide ignores OME's sub-IFD pyramid and PhysicalSizeX
            if vendor is None:
                continue
            try:
                return openslide_scan.OpenSlideScan(path, vendor, calibration)
            except UnreadableScanError as exc:
                opened_but_damaged = exc  # the next reader may still read it
        elif reader is Reader.TIFFFILE:
            try:
                return TiffScan(path, calibration)
            except UnsupportedScanError:
                if opened_but_damaged is None:
                    raise
                # OpenSlide knows the file and decodes its compression, yet found it
                # damaged: that says more than a codec the fallback lacks.
                raise opened_but_damaged from None
        elif reader is Reader.PILLOW:
            return ImageScan(path, calibration)
    if opened_but_damaged is not None:
        raise opened_but_damaged
    raise UnreadableScanError(
        path,
        f"the slide reader does not recognise this {path.suffix.lower()} file: it is damaged, "
        "incomplete, or from a scanner model that is not supported",
    )


def open_scan(path: Path | str, calibration: Calibration | float = 0.0) -> Scan:
    """Open a scan file for region reading at 0.25 um/px.

    ``calibration``: the configured fallback for a file without a pixel size
    (``config.calibration``; a number is ``scan.pixel_size_um`` alone, 0 = none).
    Besides opening, checks that the image is a brightfield colour stain on a
    coarse thumbnail. Raises a ``ScanError`` subclass on any bad input.
    """
    path = Path(path)
    with fails_as(UnreadableScanError, path, _UNREADABLE):
        _check_file(path)
        scan = _open_unchecked(path, calibration)
    try:
        with fails_as(UnreadableScanError, path, _UNREADABLE):
            check_brightfield(path, scan.thumbnail(max(_THUMBNAIL_UM, TARGET_UM_PER_PX)))
    except BaseException:
        scan.close()
        raise
    return scan


def probe(path: Path | str, calibration: Calibration | float = 0.0) -> ScanInfo:
    """Check that a scan (or a cell or field folder) opens cleanly; returns what it is.

    Reads headers, the pixel size, a coarse thumbnail and one full-resolution
    tile from the middle, so that a truncated file fails here, before queuing.
    A field folder: every photo's header, and the first photo opened in full.
    """
    path = Path(path)
    if path.is_dir() and folder_layout(path) is Layout.FIELD_FOLDER:
        fields = open_field_folder(path, calibration)
        info = probe(fields.fields[0], fields.calibration)
        return ScanInfo(
            **{
                **info.to_dict(),
                "path": str(path),
                "format": "fields",
                "bytes": sum(p.stat().st_size for p in fields.fields),
                "width": len(fields),
                "height": 1,
            },
        )
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
            pixel_size_um=folder.pixel_size_um
            or pixel_size.calibration(calibration).pixel_size_um
            or TARGET_UM_PER_PX,
            pixel_size_source="metadata" if folder.pixel_size_um else "config",
            level_count=1,
        )
    with open_scan(path, calibration) as scan:
        side = min(512, scan.width, scan.height)
        scan.read_region((scan.width - side) // 2, (scan.height - side) // 2, side, side)
        return scan.info()
