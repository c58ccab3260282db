"""Scans OpenSlide reads: SVS, NDPI, MRXS, SCN, DICOM WSI, generic tiled TIFF, ..."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from . import pixel_size
from .base import Level, Scan
from .errors import UnreadableScanError, fails_as
from .limits import check_dimensions, check_tile
from .tiff_scan import check_tiff_tiles


def detect(path: Path) -> str | None:
    """OpenSlide's vendor name for ``path`` (e.g. "aperio", "generic-tiff") or None."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def metadata_um(props: dict[str, str]) -> tuple[float, float] | None:
    try:
        return float(props[openslide.PROPERTY_NAME_MPP_X]), float(
            props[openslide.PROPERTY_NAME_MPP_Y]
        )
    except (KeyError, ValueError):
        pass
    # Some writers store only TIFF resolution tags; OpenSlide copies them as tiff.* properties.
    unit = props.get("tiff.ResolutionUnit", "")
    try:
        x = pixel_size.from_resolution(float(props["tiff.XResolution"]), unit)
        y = pixel_size.from_resolution(float(props["tiff.YResolution"]), unit)
    except (KeyError, ValueError):
        return None
    return (x, y) if x and y else None


def _check_levels(path: Path, levels: tuple[Level, ...], props: dict[str, str]) -> None:
    """Every level's size, and its tile size where OpenSlide says it, from the headers:
    OpenSlide allocates a whole tile to decode it and aborts the process when it cannot."""
    for index, level in enumerate(levels):
        check_dimensions(path, level.width, level.height)
        tile = (props.get(f"openslide.level[{index}].tile-{side}") for side in ("width", "height"))
        width, height = (int(value) if value and value.isdigit() else 0 for value in tile)
        check_tile(path, width, height)


class OpenSlideScan(Scan):
    def __init__(self, path: Path, vendor: str, configured: pixel_size.Calibration | float) -> None:
        reason = (
            f"this {path.suffix.lower()} file cannot be opened: it is damaged or incomplete "
            "(the copy may be unfinished)"
        )
        with fails_as(UnreadableScanError, path, reason):
            self._slide = openslide.OpenSlide(str(path))
        try:
            props = dict(self._slide.properties)
            levels = tuple(
                Level(w, h, float(d))
                for (w, h), d in zip(
                    self._slide.level_dimensions, self._slide.level_downsamples, strict=True
                )
            )
            _check_levels(path, levels, props)
            check_tiff_tiles(path)
            mpp_x, mpp_y, source = pixel_size.resolve(path, metadata_um(props), configured)
        except BaseException:
            self._slide.close()
            raise
        self.format = f"openslide:{vendor}"
        super().__init__(path, levels, mpp_x, mpp_y, source)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        downsample = self.levels[level].downsample
        region = self._slide.read_region(
            (round(x * downsample), round(y * downsample)), level, (w, h)
        )
        rgba = np.asarray(region)
        # OpenSlide returns un-premultiplied RGBA; transparent means "no data": white glass.
        alpha = rgba[..., 3:4].astype(np.uint16)
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        self._slide.close()
