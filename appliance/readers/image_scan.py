"""Single microscope fields (PNG, JPEG, BMP, small TIFF) read whole with Pillow.

The dimensions are checked from the header before decoding; Pillow's own bomb
limit is raised to ours so that its check never fires first with another message.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import pixel_size
from .base import Level, Scan
from .errors import (
    NotAnImageError,
    NotBrightfieldError,
    ScanError,
    UnreadableScanError,
    fails_as,
)
from .limits import MAX_FIELD_PIXELS, check_dimensions

_RGB_MODES = {"RGB", "RGBA", "P", "CMYK", "YCbCr"}
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_DAMAGED_HEADER = "the image is damaged: its header cannot be read"
_DAMAGED_DATA = (
    "truncated or damaged image: its pixel data ends early or cannot be decoded "
    "(the copy may be incomplete)"
)


def metadata_um(image: Image.Image) -> tuple[float, float] | None:
    """(x, y) um/px from an open image's header (its resolution in a physical unit)."""
    dpi = image.info.get("dpi")
    if image.format == "JPEG" and image.info.get("jfif_unit") == 2:
        density = image.info.get("jfif_density", (0, 0))
        x, y = (pixel_size.from_resolution(float(d), "centimeter") for d in density)
        return (x, y) if x and y else None
    if image.format == "JPEG" and image.info.get("jfif_unit") == 0:
        return None  # JFIF unit 0: an aspect ratio, not a size
    if dpi:
        x, y = (pixel_size.from_resolution(float(d), "inch") for d in dpi)
        return (x, y) if x and y else None
    return None


def open_image(path: Path, max_pixels: int = MAX_FIELD_PIXELS) -> Image.Image:
    """Open with Pillow and check the header's size; raises ScanError subclasses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own check below, from the header
        try:
            with fails_as(UnreadableScanError, path, _DAMAGED_HEADER):
                try:
                    image = Image.open(path)
                except UnidentifiedImageError:
                    raise NotAnImageError(
                        path, "not an image: its contents match no image format"
                    ) from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    try:
        check_dimensions(path, image.width, image.height, max_pixels=max_pixels)
    except ScanError:
        image.close()
        raise
    return image


def decode_rgb(path: Path, image: Image.Image) -> np.ndarray:
    """Decode to uint8 RGB; grayscale / 16-bit / multi-frame fluorescence is rejected."""
    if image.mode not in _RGB_MODES:
        kind = "grayscale image" if image.mode in _GRAY_MODES else "image not in 8-bit colour"
        raise NotBrightfieldError(
            path, f"{kind}: an 8-bit colour (RGB) brightfield image is needed"
        )
    with fails_as(UnreadableScanError, path, _DAMAGED_DATA):
        frames = getattr(image, "n_frames", 1)  # a TIFF walks its directories for this
        if frames > 1 and image.format == "TIFF":
            raise NotBrightfieldError(path, f"a TIFF of {frames} frames: looks like fluorescence")
        image.load()
        rgb = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
        return np.asarray(rgb)


class ImageScan(Scan):
    def __init__(self, path: Path, configured: pixel_size.Calibration | float) -> None:
        image = open_image(path)
        with image:
            mpp_x, mpp_y, source = pixel_size.resolve(path, metadata_um(image), configured)
            self._pixels = decode_rgb(path, image)
            self.format = f"image:{(image.format or 'unknown').lower()}"
        height, width = self._pixels.shape[:2]
        super().__init__(path, (Level(width, height, 1.0),), mpp_x, mpp_y, source)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._pixels[y : y + h, x : x + w]
