"""Microscope-camera fields: a folder of photos of one smear, or one photo alone.

A technician photographs 10-50 fields of a smear through a microscope camera
(peripheral blood at 100x oil, marrow at 40x-100x). A folder of such photos is
one slide:

- its images are field photos, each a JPEG / PNG / BMP or a TIFF holding one
  untiled image (``is_field_file``; a scanner's tiled, pyramidal TIFF is a slide
  scan);
- its ``manifest.json`` may list the fields ``{"fields": ["f01.jpg", ...]}`` and
  state their pixel size (``{"pixel_size_um": 0.075}`` or ``{"camera":
  "bench1-100x"}``, a ``[cameras.<name>]`` section of the configuration);
  without a list the fields are its image files in name order, and each must be
  larger than ``formats.MAX_CELL_SIDE`` a side (a crop of one cell is smaller:
  that is a cell folder), as the folder was told apart by that size. Listed
  fields may be any size (tiles of 512 px are common);
- each field's pixel size follows ``pixel_size.resolve``: its own sidecar, the
  folder's manifest, the file's metadata, the configuration; at that size a field
  must show at least ``formats.MIN_FIELD_UM`` a side, room for a cell, and at most
  ``limits.MAX_FIELD_GRID_PIXELS`` at the working grid (1 mm2), where it is read whole;
- the folder is read as it is: whether a folder in the inbox is copied in full
  (``.ready``) is the inbox's question.

A single photo with a pixel size is a folder of one field (``single_field``), held
to the same least size.
Each field is opened with ``appliance.readers.open_scan(path,
folder.calibration)``, so a damaged or grayscale photo gets the readers' own
one-line reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tifffile
from PIL import Image

from . import formats, pixel_size
from .base import TARGET_UM_PER_PX
from .errors import FieldFolderError, PixelSizeError, fails_as, listed_files
from .formats import MANIFEST_FILE, MAX_CELL_SIDE, MIN_FIELD_UM, Reader
from .image_scan import metadata_um
from .limits import MAX_FIELD_GRID_PIXELS
from .pixel_size import Calibration

_MANIFEST_EXAMPLE = '{"fields": ["f01.jpg", ...], "pixel_size_um": 0.075}'


@dataclass(frozen=True)
class FieldFolder:
    """The field photos of one smear and what their pixel size falls back on."""

    path: Path  # the folder (or the photo itself, for a single field)
    fields: tuple[Path, ...]
    calibration: Calibration  # the configuration's, with the folder manifest's statement

    def __len__(self) -> int:
        return len(self.fields)

    def name(self, index: int) -> str:
        """A field's name as tables show it: its file name."""
        return self.fields[index].name


def is_field_file(path: Path) -> bool:
    """A photo read whole: JPEG / PNG / BMP, or a TIFF of one untiled image (by its header)."""
    try:
        fmt = formats.sniff(path)
    except OSError:
        return False
    if fmt is None:
        return False
    if Reader.PILLOW in fmt.readers:
        return True
    if Reader.TIFFFILE not in fmt.readers:
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            first = tif.pages.first
            return len(tif.series) == 1 and len(tif.series[0].levels) == 1 and not first.is_tiled
    except Exception:  # an unparseable TIFF is the slide readers' to explain
        return False


def single_field(path: Path, calibration: Calibration | float = 0.0) -> FieldFolder:
    """One photo as a folder of one field (the readers check the rest when it is opened)."""
    field = FieldFolder(path, (path,), pixel_size.calibration(calibration))
    size = formats.image_size(path)
    if size is not None:
        _check_field_size(path, path, size, field.calibration)
    return field


def _manifest(folder: Path, cal: Calibration) -> tuple[list[Path] | None, Calibration]:
    """The fields a manifest lists (None: not listed) and the calibration with its statement."""
    where = MANIFEST_FILE
    data = pixel_size.read_json(folder, folder / MANIFEST_FILE, where)
    stated = pixel_size.stated_um(folder, data, where, cal)
    if stated is not None:
        x, y, source = stated
        cal = cal.for_folder(x, y, "manifest" if source == "sidecar" else source)
    if "fields" not in data:
        return None, cal
    with fails_as(FieldFolderError, folder, f"{where} must list the fields, {_MANIFEST_EXAMPLE}"):
        names = [str(name) for name in data["fields"]]
    return listed_files(FieldFolderError, folder, where, names), cal


def _check_field(folder: Path, path: Path, cal: Calibration, listed: bool) -> None:
    size = formats.image_size(path)
    if size is None and not is_field_file(path):
        raise FieldFolderError(
            folder, f"field {path.name} is not a readable image (not an image, or damaged)"
        )
    if not listed and size is not None:
        _check_not_a_crop(folder, path, size)
    if not is_field_file(path):
        raise FieldFolderError(
            folder,
            f"{path.name} is a tiled slide scan, not a field photo: put scans beside the "
            "folder of fields, not inside it",
        )
    if size is not None:
        _check_field_size(folder, path, size, cal)


def _check_not_a_crop(folder: Path, path: Path, size: tuple[int, int]) -> None:
    """Unlisted, the folder is one of fields by its photos' size: a crop does not belong."""
    if formats.fits_a_cell(size):
        raise FieldFolderError(
            folder,
            f"field {path.name} is only {size[0]}x{size[1]} px: a field photo is larger than "
            f"{MAX_CELL_SIDE} px a side (crops of single cells go in a folder of their own; "
            f'tiles of a field are listed as "fields" in {MANIFEST_FILE})',
        )


def _check_field_size(where: Path, path: Path, size: tuple[int, int], cal: Calibration) -> None:
    """A photo must show enough of the smear for a cell and the crop around it, and no
    more than ``limits.MAX_FIELD_GRID_PIXELS`` at the working grid, where it is read whole."""
    um = _pixel_um(path, cal)
    if um is None:
        return  # no pixel size yet: opening the photo says why
    width, height = size[0] * um[0], size[1] * um[1]
    if min(width, height) < MIN_FIELD_UM:
        raise FieldFolderError(
            where,
            f"field {path.name} shows only {width:.0f} x {height:.0f} um of the smear "
            f"({size[0]}x{size[1]} px at {um[0]:.3g} um/px): too small to hold a white cell, "
            f"which is looked at in a {MIN_FIELD_UM:.0f} um square",
        )
    if (width / TARGET_UM_PER_PX) * (height / TARGET_UM_PER_PX) > MAX_FIELD_GRID_PIXELS:
        raise FieldFolderError(
            where,
            f"field {path.name} shows {width / 1000:.1f} x {height / 1000:.1f} mm of the smear "
            f"({size[0]}x{size[1]} px at {um[0]:.3g} um/px): a field photo shows at most 1 mm2 "
            "of it; it was taken at a low magnification, or its pixel size is wrong",
        )


def _pixel_um(path: Path, cal: Calibration) -> tuple[float, float] | None:
    """(x, y) um/px of a photo by its header and the folder's statements, or None."""
    try:
        with Image.open(path) as image:
            metadata = metadata_um(image)
        x, y, _ = pixel_size.resolve(path, metadata, cal)
    except (OSError, ValueError, Image.DecompressionBombError, PixelSizeError):
        return None
    return x, y


def open_field_folder(folder: Path, calibration: Calibration | float = 0.0) -> FieldFolder:
    """Validate a folder of fields as it is; raises FieldFolderError with a one-line reason."""
    folder = Path(folder)
    cal = pixel_size.calibration(calibration)
    if not folder.is_dir():
        raise FieldFolderError(folder, "not a folder: a smear's field photos go in one folder")
    listed: list[Path] | None = None
    if (folder / MANIFEST_FILE).is_file():
        listed, cal = _manifest(folder, cal)
    fields = listed
    if fields is None:
        with fails_as(FieldFolderError, folder, "the folder cannot be listed"):
            fields = sorted(
                p
                for p in folder.iterdir()
                if p.is_file()
                and not p.name.startswith(".")
                and p.suffix.lower() in formats.FIELD_EXTENSIONS
            )
    if not fields:
        extensions = ", ".join(formats.FIELD_FORMAT.extensions)
        raise FieldFolderError(folder, f"the folder holds no field photos ({extensions})")
    for path in fields:
        _check_field(folder, path, cal, listed is not None)
    return FieldFolder(folder, tuple(fields), cal)
