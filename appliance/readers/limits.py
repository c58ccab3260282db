"""Size limits checked from headers, before any pixel is decoded (decompression-bomb guard)."""

from __future__ import annotations

from pathlib import Path

from .errors import ImageTooLargeError

# A 75 x 25 mm slide at 0.25 um/px is 300,000 x 100,000 px; nothing real is larger.
MAX_SIDE = 400_000
MAX_PIXELS = 60_000_000_000
# Images decoded whole (PNG / JPEG / untiled TIFF fields, single cells): ~300 MB RGB at most.
MAX_FIELD_PIXELS = 100_000_000
# A field photo at the 0.25 um/px working grid, where it is read whole: 4096 x 4096 px,
# 1 mm2 of the smear, more than a 20x objective's field of view. The pipeline holds
# a few copies of it (about 1 GB at 64 M px), so a header's pixel size must not inflate
# a small photo past it.
MAX_FIELD_GRID_PIXELS = 4096 * 4096
# One tile of a tiled TIFF.
MAX_TILE_PIXELS = 16 * 1024 * 1024


def check_dimensions(path: Path, width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    if width <= 0 or height <= 0:
        raise ImageTooLargeError(
            path,
            f"the header gives impossible dimensions, {width}x{height} px: the file is damaged",
        )
    if width > MAX_SIDE or height > MAX_SIDE or width * height > max_pixels:
        raise ImageTooLargeError(
            path,
            f"the header claims {width}x{height} px, which would exceed any real slide: "
            "the file is damaged or not a slide scan",
        )


def check_tile(path: Path, width: int, height: int) -> None:
    """A tile, decoded whole by any reader, must be of a size scanners write."""
    if width * height > MAX_TILE_PIXELS:
        raise ImageTooLargeError(
            path,
            f"its tiles of {width}x{height} px are far larger than any scanner writes: "
            "the file is damaged",
        )
