"""A folder of single-cell images: the peripheral-blood workflow (no segmentation).

One folder per patient (the folder name is the patient / case id) holding
crops, 144x144 px by default (Metafer exports TIFF). The folder is complete when
it holds a ``.ready`` file or a ``manifest.json``; the manifest, when present,
lists the cells: ``{"cells": ["c0001.tif", ...], "pixel_size_um": 0.25}``
(``pixel_size_um`` optional) and every listed file must exist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CellFolderError, ScanError
from .image_scan import decode_rgb, open_image

READY_FILE = ".ready"
MANIFEST_FILE = "manifest.json"
CELL_EXTENSIONS = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}
MAX_CELL_PIXELS = 1024 * 1024  # a single cell crop; anything larger is not one


def is_complete(folder: Path) -> bool:
    return (folder / READY_FILE).is_file() or (folder / MANIFEST_FILE).is_file()


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
            with open_image(path, max_pixels=MAX_CELL_PIXELS) as image:
                return decode_rgb(path, image)
        except ScanError as exc:
            raise CellFolderError(self.path, f"cell image {path.name}: {exc.reason}") from None

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(file name, image) for every cell, in name order."""
        for index, path in enumerate(self.image_paths):
            yield path.name, self.read(index)


def open_cell_folder(folder: Path) -> CellFolder:
    """Validate a complete cell folder; raises CellFolderError with a one-line reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CellFolderError(folder, "not a folder")
    if not is_complete(folder):
        raise CellFolderError(
            folder, f"not complete yet: no {READY_FILE} file and no {MANIFEST_FILE}"
        )
    pixel_um: float | None = None
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            names = [str(name) for name in data["cells"]]
            pixel_um = float(data["pixel_size_um"]) if "pixel_size_um" in data else None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CellFolderError(folder, f"{MANIFEST_FILE} is not valid: {exc}") from None
        paths = [folder / name for name in names]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise CellFolderError(
                folder, f"{MANIFEST_FILE} lists {len(missing)} missing files, e.g. {missing[0]}"
            )
    else:
        paths = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CELL_EXTENSIONS
        )
    if not paths:
        raise CellFolderError(folder, "holds no cell images")
    return CellFolder(folder, folder.name, tuple(paths), pixel_um)
