"""The optimal cellular zone and the 200 x 200 um tiles streamed from it.

Cellular-zone rule (METHOD.md A: the monolayer between the thick body and the
feathered edge), decided on a low-resolution thumbnail (``mask_um_per_px``,
2-4 um/px for a slide), never on full-resolution pixels:

1. Glass colour = the median of the brightest 2 % of thumbnail pixels; a pixel
   is *covered* when its optical density (summed over R, G, B, relative to the
   glass) exceeds ``COVER_OD`` (0.06).
2. A pixel is *thick* when more than ``THICK_COVER`` (90 %) of its neighbourhood
   of ``THICK_WINDOW_UM`` (28 um, about 4 red cells across) is covered: in a
   monolayer cells lie side by side with glass between them; in the thick body
   they pile up and no glass shows.
3. A tile belongs to the zone when at least ``MIN_COVER`` (3 %) of it is
   covered (not empty glass / bare feathered edge) and at most ``MAX_THICK``
   (25 %) of it is thick.

A scan with less than ``BLANK_COVER`` (0.2 %) covered pixels overall is blank
(``BlankScanError``). Tiles are ``TILE_PX`` (800 px = 200 um at 0.25 um/px) on
a fixed grid from the scan's origin; each is read with ``margin`` extra pixels
on every side (white beyond the scan) so that cells on a seam are whole in at
least one tile. A cell belongs to the tile whose *core* holds its centroid
(``Tile.owns``): that is how seams are de-duplicated.

Visiting order (``visiting_order``): a slide's work is bounded by a cell budget
(the bundle's ``cells.max_cells_per_slide``), so the best tiles come first.
Each tile is scored on the zone thumbnail: the fraction of its pixels whose
basophilic concentration is above Otsu's threshold over the zone (estimated
nucleated-cell density), times its monolayer share (1 - thick fraction). The
zone is cut into about ``SPREAD_BLOCKS`` square blocks of tiles; the visit
takes the best unvisited tile of every block in turn, so that the cells kept
before the budget stops the slide come from the whole zone, not one corner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from appliance.pipeline.qc import otsu_threshold
from appliance.pipeline.stain import optical_density
from appliance.readers import BlankScanError, Scan
from appliance.readers.base import TARGET_UM_PER_PX

TILE_UM = 200.0
TILE_PX = round(TILE_UM / TARGET_UM_PER_PX)  # 800
DEFAULT_MARGIN_PX = 64  # > half the largest kept cell (5000 px area: ~80 px across)
COVER_OD = 0.06
THICK_WINDOW_UM = 28.0
THICK_COVER = 0.9
MIN_COVER = 0.03
MAX_THICK = 0.25
BLANK_COVER = 0.002
SPREAD_BLOCKS = 16
BAND_ROWS = 256


@dataclass(frozen=True)
class CellularZone:
    """Per-tile zone decision on the thumbnail grid (rows x cols of TILE_PX tiles)."""

    in_zone: np.ndarray  # bool (rows, cols)
    cover: np.ndarray  # float (rows, cols): covered fraction of each tile
    thick: np.ndarray  # float (rows, cols): thick fraction of each tile
    mask_um_per_px: float
    glass_rgb: tuple[float, float, float]
    covered_fraction: float  # of the whole scan

    @property
    def n_tiles(self) -> int:
        return int(self.in_zone.sum())

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.in_zone.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class TileSpec:
    """Where a tile lies, in 0.25 um/px scan pixels."""

    tile_id: int  # row * n_cols + col
    row: int
    col: int
    x: int  # core's top-left
    y: int
    width: int  # core size (smaller at the scan's right / bottom edge)
    height: int
    margin: int

    @property
    def origin(self) -> tuple[int, int]:
        """Scan coordinates of the tile image's pixel (0, 0)."""
        return self.x - self.margin, self.y - self.margin


@dataclass(frozen=True)
class Tile:
    spec: TileSpec
    image: np.ndarray  # uint8 (TILE_PX + 2 margin, TILE_PX + 2 margin, 3)

    @property
    def core(self) -> np.ndarray:
        """The tile without its margin (what QC judges)."""
        m, s = self.spec.margin, self.spec
        return self.image[m : m + s.height, m : m + s.width]

    def owns(self, x: float, y: float) -> bool:
        """Whether a cell centred at scan (x, y) belongs to this tile (seam de-duplication)."""
        s = self.spec
        return s.x <= x < s.x + s.width and s.y <= y < s.y + s.height


def mask_resolution(scan: Scan) -> float:
    """um/px of the zone thumbnail: ~1024 px on the long side, between 0.25 and 4 um/px."""
    long_side_um = max(scan.width, scan.height) * TARGET_UM_PER_PX
    return float(np.clip(long_side_um / 1024, TARGET_UM_PER_PX, 4.0))


def cellular_zone(scan: Scan, mask_um_per_px: float | None = None) -> CellularZone:
    """Decide which tiles are in the cellular zone; raises BlankScanError on a blank scan."""
    um = mask_um_per_px or mask_resolution(scan)
    thumb = scan.thumbnail(um)
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    luminance = in_bands(thumb, lambda band: band.astype(np.float32) @ luma)
    glass = np.median(thumb[luminance >= np.percentile(luminance, 98)].astype(np.float32), axis=0)
    covered = in_bands(thumb, lambda band: optical_density(band, glass).sum(axis=-1) > COVER_OD)
    covered_fraction = float(covered.mean())
    if covered_fraction < BLANK_COVER:
        raise BlankScanError(scan.path, "blank slide: no stained cells found")
    window = max(3, round(THICK_WINDOW_UM / um) | 1)
    thick = ndimage.uniform_filter(covered.astype(np.float32), window, mode="nearest") > THICK_COVER
    rows = -(-scan.height // TILE_PX)
    cols = -(-scan.width // TILE_PX)
    cover = per_tile_mean(covered, (rows, cols), um)
    thick_frac = per_tile_mean(thick, (rows, cols), um)
    in_zone = (cover >= MIN_COVER) & (thick_frac <= MAX_THICK)
    glass_rgb = (float(glass[0]), float(glass[1]), float(glass[2]))
    return CellularZone(in_zone, cover, thick_frac, um, glass_rgb, covered_fraction)


def in_bands(image: np.ndarray, func: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``func`` over ``image`` in bands of ``BAND_ROWS`` rows, joined: float work on a
    slide-wide thumbnail (6,250 x 3,125 px for a 25 x 12.5 mm smear) holds one band."""
    rows = range(0, image.shape[0], BAND_ROWS)
    return np.concatenate([func(image[r : r + BAND_ROWS]) for r in rows])


def per_tile_mean(mask: np.ndarray, grid: tuple[int, int], um_per_px: float) -> np.ndarray:
    """float (rows, cols): the mean of a thumbnail ``mask`` (at ``um_per_px``) over each tile."""
    rows, cols = grid
    tile_thumb = TILE_UM / um_per_px  # thumbnail pixels per tile
    out = np.zeros((rows, cols))
    for r in range(rows):
        y0 = round(r * tile_thumb)
        y1 = max(round((r + 1) * tile_thumb), y0 + 1)
        for c in range(cols):
            x0 = round(c * tile_thumb)
            x1 = max(round((c + 1) * tile_thumb), x0 + 1)
            block = mask[y0:y1, x0:x1]
            out[r, c] = block.mean() if block.size else 0.0
    return out


def tile_scores(basophilic: np.ndarray, zone: CellularZone, floor: float) -> np.ndarray:
    """float (rows, cols): each tile's estimated nucleated-cell density times its
    monolayer share. ``basophilic``: the zone thumbnail's basophilic concentration;
    ``floor``: the lowest threshold that still means a nucleus (QC's ``min_basophilic``)."""
    rows, cols = zone.grid_shape
    values = basophilic[basophilic > floor]
    threshold = max(otsu_threshold(values), floor) if values.size else floor
    nuclear = per_tile_mean(basophilic > threshold, (rows, cols), zone.mask_um_per_px)
    return np.where(zone.in_zone, nuclear * (1.0 - zone.thick), 0.0)


def visiting_order(specs: list[TileSpec], scores: np.ndarray) -> list[TileSpec]:
    """``specs`` best-first and spread over the zone (module docstring)."""
    if len(specs) <= 1:
        return list(specs)
    rows = [s.row for s in specs]
    cols = [s.col for s in specs]
    extent = max(max(rows) - min(rows), max(cols) - min(cols)) + 1
    side = max(1, int(np.ceil(extent / np.sqrt(SPREAD_BLOCKS))))
    blocks: dict[tuple[int, int], list[TileSpec]] = {}
    for spec in specs:
        key = ((spec.row - min(rows)) // side, (spec.col - min(cols)) // side)
        blocks.setdefault(key, []).append(spec)
    queues = [
        sorted(members, key=lambda s: (-scores[s.row, s.col], s.tile_id))
        for _, members in sorted(blocks.items())
    ]
    order: list[TileSpec] = []
    for depth in range(max(len(q) for q in queues)):
        layer = [q[depth] for q in queues if depth < len(q)]
        order.extend(sorted(layer, key=lambda s: (-scores[s.row, s.col], s.tile_id)))
    return order


def tile_grid(scan: Scan, zone: CellularZone, margin: int = DEFAULT_MARGIN_PX) -> list[TileSpec]:
    """The zone's tiles in row-major order (small records; the pixels come from iter_tiles)."""
    cols = zone.grid_shape[1]
    specs = []
    for r, c in zip(*np.nonzero(zone.in_zone), strict=True):
        x, y = int(c) * TILE_PX, int(r) * TILE_PX
        specs.append(
            TileSpec(
                tile_id=int(r) * cols + int(c),
                row=int(r),
                col=int(c),
                x=x,
                y=y,
                width=min(TILE_PX, scan.width - x),
                height=min(TILE_PX, scan.height - y),
                margin=margin,
            )
        )
    return specs


def read_tile(scan: Scan, spec: TileSpec) -> Tile:
    side = TILE_PX + 2 * spec.margin
    x, y = spec.origin
    return Tile(spec, scan.read_region(x, y, side, side))


def iter_tiles(scan: Scan, specs: Iterable[TileSpec]) -> Iterator[Tile]:
    """Read tiles one at a time: memory holds one tile, whatever the scan's size."""
    for spec in specs:
        yield read_tile(scan, spec)


def sample_specs(specs: list[TileSpec], n: int, seed: int = 0) -> list[TileSpec]:
    """Up to ``n`` tiles spread over the zone, e.g. for stain estimation."""
    if len(specs) <= n:
        return list(specs)
    rng = np.random.default_rng(seed)
    return [specs[i] for i in sorted(rng.choice(len(specs), n, replace=False))]
