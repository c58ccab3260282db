"""The reader interface every scan format implements, and the resampling shared by all.

Coordinates: the pipeline works on one grid, ``TARGET_UM_PER_PX`` (0.25 um/px,
the paper's 40x). ``Scan.width`` / ``Scan.height`` and ``read_region`` are in
that grid whatever the file's native resolution. A region is read from the
coarsest pyramid level that is still at least as fine as the target (so
resampling only ever shrinks, never invents detail; a scan coarser than the
target is read at level 0 and enlarged), then resampled with Pillow's
antialiased bilinear filter using a sub-pixel box, so neighbouring regions
line up exactly. Pixels outside the scan read as white (empty glass).

A subclass may resample other rasters on exactly this geometry by changing
``resample`` and ``_blank``: the segmenter's training reads an annotated field's
label image with nearest-neighbour resampling and 0 outside, so that labels land
on the pixels serving will see (export/segmenter_fields.py).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from .errors import NotBrightfieldError, UnreadableScanError, fails_as

TARGET_UM_PER_PX = 0.25
WHITE = 255
# One read_region call may return at most this many pixels (a programming guard, ~200 MB RGB).
MAX_REGION_PIXELS = 64 * 1024 * 1024
_DAMAGED_DATA = (
    "the image data is damaged: part of the scan cannot be decoded (the copy may be incomplete)"
)
# Blocks of this many output pixels per side when a thumbnail is assembled from a large level.
_THUMB_BLOCK = 512


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in its own pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float


@dataclass(frozen=True)
class ScanInfo:
    """What ``probe`` and ``Scan.info`` report; JSON-serialisable via ``to_dict``."""

    path: str
    format: str  # e.g. "openslide:aperio", "tifffile:ome", "image:png", "cells"
    bytes: int
    width: int  # at TARGET_UM_PER_PX (for "cells": the number of cell images)
    height: int
    native_width: int
    native_height: int
    pixel_size_um: float  # native level-0 pixel size (x); y may differ slightly
    pixel_size_source: str  # "metadata" | "sidecar" | "config"
    level_count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scan(ABC):
    """An open scan. Use as a context manager; all reads are bounded in memory."""

    format: str
    resample = Image.Resampling.BILINEAR  # how ``_resampled`` filters (see module docstring)

    def __init__(
        self,
        path: Path,
        levels: tuple[Level, ...],
        mpp_x: float,
        mpp_y: float,
        pixel_size_source: str,
    ) -> None:
        self.path = path
        self.levels = levels
        self.mpp_x = mpp_x
        self.mpp_y = mpp_y
        self.pixel_size_source = pixel_size_source
        base = levels[0]
        self.width = max(1, round(base.width * mpp_x / TARGET_UM_PER_PX))
        self.height = max(1, round(base.height * mpp_y / TARGET_UM_PER_PX))
        self._read_level_index = self.level_for(TARGET_UM_PER_PX)

    # -- what a format provides ------------------------------------------------------------
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) from ``level`` at level pixel (x, y); the window is inside the level."""

    def close(self) -> None:  # noqa: B027 - formats without handles need nothing
        """Release file handles."""

    # -- shared ---------------------------------------------------------------------------
    def __enter__(self) -> Scan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) at TARGET_UM_PER_PX."""
        return self.width, self.height

    def level_um_per_px(self, level: int) -> float:
        return self.mpp_x * self.levels[level].downsample

    def level_for(self, um_per_px: float) -> int:
        """The coarsest level still at least as fine as ``um_per_px`` (level 0 if none is)."""
        best = 0
        for index in range(len(self.levels)):
            fine_enough = self.level_um_per_px(index) <= um_per_px * 1.01
            if fine_enough and self.level_um_per_px(index) >= self.level_um_per_px(best):
                best = index
        return best

    def info(self) -> ScanInfo:
        return ScanInfo(
            path=str(self.path),
            format=self.format,
            bytes=self.path.stat().st_size if self.path.is_file() else 0,
            width=self.width,
            height=self.height,
            native_width=self.levels[0].width,
            native_height=self.levels[0].height,
            pixel_size_um=self.mpp_x,
            pixel_size_source=self.pixel_size_source,
            level_count=len(self.levels),
        )

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB at 0.25 um/px; (x, y) is the top-left in that grid."""
        if w <= 0 or h <= 0:
            raise ValueError(f"empty region {w}x{h}")
        if w * h > MAX_REGION_PIXELS:
            raise ValueError(f"region {w}x{h} exceeds {MAX_REGION_PIXELS} pixels: read in tiles")
        return self._resampled(self._read_level_index, x, y, w, h, TARGET_UM_PER_PX)

    def thumbnail(self, um_per_px: float = 8.0) -> np.ndarray:
        """The whole scan at ``um_per_px`` (coarser than the target), assembled block by block."""
        if um_per_px < TARGET_UM_PER_PX:
            raise ValueError("a thumbnail is coarser than the 0.25 um/px working grid")
        scale = TARGET_UM_PER_PX / um_per_px
        out_w = max(1, math.ceil(self.width * scale))
        out_h = max(1, math.ceil(self.height * scale))
        level = self.level_for(um_per_px)
        out = np.empty((out_h, out_w, 3), np.uint8)
        for by in range(0, out_h, _THUMB_BLOCK):
            for bx in range(0, out_w, _THUMB_BLOCK):
                bw, bh = min(_THUMB_BLOCK, out_w - bx), min(_THUMB_BLOCK, out_h - by)
                out[by : by + bh, bx : bx + bw] = self._resampled(level, bx, by, bw, bh, um_per_px)
        return out

    def _resampled(
        self, level: int, x: int, y: int, w: int, h: int, out_um_per_px: float
    ) -> np.ndarray:
        """Output pixels (x, y, w, h) of a grid at ``out_um_per_px`` read from ``level``."""
        lvl = self.levels[level]
        # Level pixels per output pixel, per axis.
        sx = out_um_per_px / (self.mpp_x * lvl.downsample)
        sy = out_um_per_px / (self.mpp_y * lvl.downsample)
        fx0, fy0, fx1, fy1 = x * sx, y * sy, (x + w) * sx, (y + h) * sy
        exact = abs(sx - 1) < 1e-6 and abs(sy - 1) < 1e-6
        pad = 0 if exact else 2  # context for the filter at the window's edges
        lx0, ly0 = math.floor(fx0) - pad, math.floor(fy0) - pad
        lx1, ly1 = math.ceil(fx1) + pad, math.ceil(fy1) + pad
        window = self._padded_level_window(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        if exact:
            return window[:h, :w]
        box = (fx0 - lx0, fy0 - ly0, fx1 - lx0, fy1 - ly0)
        resized = Image.fromarray(window).resize((w, h), self.resample, box=box)
        return np.asarray(resized)

    def _padded_level_window(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lvl = self.levels[level]
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + w, lvl.width), min(y + h, lvl.height)
        if cx0 == x and cy0 == y and cx1 == x + w and cy1 == y + h:
            return self._read_checked(level, x, y, w, h)
        out = self._blank(h, w)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = self._read_checked(
                level, cx0, cy0, cx1 - cx0, cy1 - cy0
            )
        return out

    def _blank(self, h: int, w: int) -> np.ndarray:
        """What lies outside the scan: white glass."""
        return np.full((h, w, 3), WHITE, np.uint8)

    def _read_checked(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``_read_level``; a decoder's failure on damaged data becomes a one-line reason."""
        with fails_as(UnreadableScanError, self.path, _DAMAGED_DATA):
            return self._read_level(level, x, y, w, h)


def check_brightfield(path: Path, thumbnail: np.ndarray) -> None:
    """Reject grayscale and dark-background (fluorescence / dark-field) images.

    A Romanowsky smear is mostly bright glass with coloured cells: its brighter
    half is bright and its stained pixels differ between channels.
    """
    pixels = thumbnail.reshape(-1, 3).astype(np.int16)
    spread = np.abs(pixels[:, 0] - pixels[:, 1]) + np.abs(pixels[:, 1] - pixels[:, 2])
    if pixels.shape[0] >= 16 and np.percentile(spread, 99.5) < 6 and pixels.std() > 2:
        raise NotBrightfieldError(path, "grayscale image: a colour brightfield scan is needed")
    luminance = pixels @ np.array([299, 587, 114]) / 1000
    if np.median(luminance) < 80:
        raise NotBrightfieldError(
            path, "dark background: looks like fluorescence or dark-field, not a brightfield stain"
        )
