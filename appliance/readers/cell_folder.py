"""A folder of single-cell images: the peripheral-blood workflow (no segmentation).

One folder per patient (the folder name is the patient / case id) holding
crops, 144x144 px by default (Metafer exports TIFF), at most
``formats.MAX_CELL_SIDE`` px a side. The folder is read as it is (whether a
folder in the inbox is copied in full is the inbox's question); its
``manifest.json``, when present, lists the cells: ``{"cells": ["c0001.tif",
...], "pixel_size_um": 0.25}`` (``pixel_size_um`` optional) and every listed
file must exist. Without a manifest the cells are the files with the extensions
of ``formats.CELL_EXTENSIONS``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import formats
from .errors import CellFolderError, ScanError, fails_as, listed_files
from .formats import MANIFEST_FILE, MAX_CELL_SIDE
from .image_scan import decode_rgb, open_image

_MANIFEST_EXAMPLE = '{"cells": ["c0001.tif", ...], "pixel_size_um": 0.25}'
# A manifest that says nothing of what the folder holds: its images' size made it a
# folder of crops; say how to list either kind.
_UNLISTED = (
    f"{MANIFEST_FILE} does not list the images: at most {MAX_CELL_SIDE} px a side, they "
    'were taken for single-cell crops; list them as "cells", or as "fields" if they are '
    "field photos"
)


@dataclass(frozen=True)
class CellFolder:
    """The cell images of one patient, read one at a time."""

    path: Path
    patient_id: str
    image_paths: tuple[Path, ...]
    pixel_size_um: float | None  # from the manifest, if it says

    def __len__(self) -> int:
        return len(self.image_paths)

    def read(self, index: int) -> np.ndarray:
        """uint8 (H, W, 3) of cell ``index``; a bad file raises CellFolderError naming it."""
        path = self.image_paths[index]
        try:
            with open_image(path, max_pixels=MAX_CELL_SIDE * MAX_CELL_SIDE) as image:
                return decode_rgb(path, image)
        except ScanError as exc:
            raise CellFolderError(self.path, f"cell image {path.name}: {exc.reason}") from None

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(file name, image) for every cell, in name order."""
        for index, path in enumerate(self.image_paths):
            yield path.name, self.read(index)


def _manifest(folder: Path) -> tuple[list[Path], float | None]:
    """The cells a manifest lists (each must exist) and its pixel size, if it gives one."""
    manifest = folder / MANIFEST_FILE
    with fails_as(CellFolderError, folder, f"{MANIFEST_FILE} cannot be read"):
        text = manifest.read_text(encoding="utf-8")
    with fails_as(CellFolderError, folder, f"{MANIFEST_FILE} is not valid JSON"):
        data = json.loads(text)
    if isinstance(data, dict) and "cells" not in data:
        raise CellFolderError(folder, _UNLISTED)
    shape = f"{MANIFEST_FILE} must list the cells, e.g. {_MANIFEST_EXAMPLE}"
    with fails_as(CellFolderError, folder, shape):
        names = [str(name) for name in data["cells"]]
        pixel_um = float(data["pixel_size_um"]) if "pixel_size_um" in data else None
    return listed_files(CellFolderError, folder, MANIFEST_FILE, names), pixel_um


def _check_crop(folder: Path, path: Path) -> None:
    """Each image must be a single-cell crop by its header (the inbox decides the same way)."""
    size = formats.image_size(path)
    if size is None:
        raise CellFolderError(
            folder, f"cell image {path.name} is not a readable image (not an image, or damaged)"
        )
    if not formats.fits_a_cell(size):
        raise CellFolderError(
            folder,
            f"cell image {path.name} is {size[0]}x{size[1]} px: a single-cell crop is at most "
            f"{MAX_CELL_SIDE} px a side",
        )


def open_cell_folder(folder: Path) -> CellFolder:
    """Validate a complete cell folder; raises CellFolderError with a one-line reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CellFolderError(folder, "not a folder: a single-cell scan is a folder of crops")
    pixel_um: float | None = None
    if (folder / MANIFEST_FILE).is_file():
        paths, pixel_um = _manifest(folder)
    else:
        with fails_as(CellFolderError, folder, "the folder cannot be listed"):
            paths = sorted(
                p
                for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in formats.CELL_EXTENSIONS
            )
    if not paths:
        extensions = ", ".join(formats.CELL_FORMAT.extensions)
        raise CellFolderError(folder, f"the folder holds no cell images ({extensions})")
    for path in paths:
        _check_crop(folder, path)
    return CellFolder(folder, folder.name, tuple(paths), pixel_um)
