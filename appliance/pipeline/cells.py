"""Cells from segmented tiles: METHOD.md A's post-filters, nucleus, patches, cell tables.

Every number in METHOD.md is stated at 0.25 um/px; ``CellFilters.at(pixel_size)``
restates them for the pixels actually analysed (areas scale with the square of
the size ratio, the patch side and the closing footprint with the ratio; shape
and confidence thresholds are scale-free).

Per object (a StarDist star-convex polygon):
- area = pixels inside the polygon; circularity = 4 pi A / P^2 of the polygon
  itself (resolution independent, 1 for a circle); eccentricity from the second
  moments of the pixel mask (as skimage's regionprops);
- nucleus = the pixels above the Otsu threshold of the basophilic concentration
  (Macenko deconvolution, appliance.pipeline.stain) inside the cell where that stain
  makes up most of the staining (``NUCLEUS_MIN_SHARE``), then a 3x3 closing (at
  0.25 um/px), kept inside the cell; N:C = nucleus / cell area. A red cell, whose
  colour on a real photo partly deconvolves as basophilic, has no such pixels (or
  too few for the N:C filter);
- centre = basophilic-intensity-weighted centroid of the nucleus;
- patch = ``patch_px`` square centred on it, padded with the background colour
  beyond the image, resized to the encoder's input (bilinear) on demand.

Tables: CSV (one row per cell, polygon as WKT) and a QuPath-importable GeoJSON
FeatureCollection of detections with measurements, both in level-0 pixels of the
scan so that they overlay it (cells of a field folder: in the pixels of the photo
each is on, named by a ``field`` column / property); a slide's tables are made once
(and cached) and the case's attention and the cell head's calls are added to them
after scoring (``csv_with_calls``, ``geojson_with_calls``; QuPath colours a cell by
its ``classification``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon as draw_polygon
from skimage.filters import threshold_otsu

from appliance.pipeline.segmentation import Detections
from runtime.bundle_format import CellsSpec

ENCODER_INPUT_PX = 224
CLOSING_PX = 3  # nucleus closing footprint at 0.25 um/px
# A nucleus pixel's basophilic share of its staining (``stain.basophilic_and_share``), at least.
# Measured (docs/fields.md): the BCCD photos' red cells, given to the cell step as
# detections, keep no nucleus from 0.4 up (at 0.33, 4 of 60 still pass as cells); the
# synthetic smears lose no nucleated cell up to 0.45 and 4 of 708 plasma cells at 0.5.
NUCLEUS_MIN_SHARE = 0.45
CLASSIFICATION = "Nucleated cell"
UNSURE = "Unsure"  # a cell below the cell head's operating point, for a person
UNSURE_RGB = (128, 128, 128)
CSV_COLUMNS = (
    "cell_id", "x", "y", "area_um2", "nucleus_area_um2", "nc_ratio", "circularity",
    "eccentricity", "confidence", "tile_id", "polygon_wkt",
)  # fmt: skip


_INT_FIELDS = ("patch_px", "closing_px")


class CellError(ValueError):
    """Cell filters or inputs that cannot be used; one line."""


@dataclass(frozen=True)
class CellFilters:
    """METHOD.md A's post-filters and patch size, stated at ``pixel_size_um``.

    The defaults are the bundle's (``runtime.bundle_format.CellsSpec``, METHOD.md's values).
    """

    pixel_size_um: float = CellsSpec.pixel_size_um
    min_object_px: float = CellsSpec.min_object_px
    min_area_px: float = CellsSpec.min_area_px
    max_area_px: float = CellsSpec.max_area_px
    min_circularity: float = CellsSpec.min_circularity
    max_eccentricity: float = CellsSpec.max_eccentricity
    min_confidence: float = CellsSpec.min_confidence
    min_nucleus_ratio: float = CellsSpec.min_nucleus_ratio
    max_nucleus_ratio: float = CellsSpec.max_nucleus_ratio
    patch_px: int = CellsSpec.patch_px
    closing_px: int = CLOSING_PX

    @classmethod
    def of(cls, cells: CellsSpec) -> CellFilters:
        """The bundle's ``cells`` section (checked when the bundle loaded)."""
        return cls(
            pixel_size_um=cells.pixel_size_um,
            min_object_px=cells.min_object_px,
            min_area_px=cells.min_area_px,
            max_area_px=cells.max_area_px,
            min_circularity=cells.min_circularity,
            max_eccentricity=cells.max_eccentricity,
            min_confidence=cells.min_confidence,
            min_nucleus_ratio=cells.min_nucleus_ratio,
            max_nucleus_ratio=cells.max_nucleus_ratio,
            patch_px=cells.patch_px,
        )

    def at(self, pixel_size_um: float) -> CellFilters:
        """The same physical filters for pixels of ``pixel_size_um``."""
        if pixel_size_um <= 0:
            raise CellError(f"pixel size must be positive, got {pixel_size_um}")
        linear = self.pixel_size_um / pixel_size_um
        area = linear**2
        return replace(
            self,
            pixel_size_um=pixel_size_um,
            min_object_px=self.min_object_px * area,
            min_area_px=self.min_area_px * area,
            max_area_px=self.max_area_px * area,
            patch_px=max(8, round(self.patch_px * linear)),
            closing_px=max(1, 2 * round((self.closing_px * linear - 1) / 2) + 1),
        )


@dataclass
class Cell:
    """One kept cell; coordinates in slide pixels at ``pixel_size_um`` (x right, y down)."""

    x: float  # intensity-weighted nucleus centroid
    y: float
    polygon: np.ndarray  # (n_rays, 2) float32 (x, y)
    area_px: float
    nucleus_area_px: float
    nc_ratio: float
    circularity: float
    eccentricity: float
    confidence: float
    tile_id: int
    pixel_size_um: float
    patch: np.ndarray | None = None  # (patch_px, patch_px, 3) uint8, centred on (x, y)

    @property
    def area_um2(self) -> float:
        return self.area_px * self.pixel_size_um**2

    def at(self, pixel_size_um: float) -> Cell:
        """The same cell in pixels of ``pixel_size_um`` (areas in um2 unchanged)."""
        ratio = self.pixel_size_um / pixel_size_um
        return replace(
            self,
            x=self.x * ratio,
            y=self.y * ratio,
            polygon=(self.polygon * ratio).astype(np.float32),
            area_px=self.area_px * ratio**2,
            nucleus_area_px=self.nucleus_area_px * ratio**2,
            pixel_size_um=pixel_size_um,
        )

    @property
    def nucleus_area_um2(self) -> float:
        return self.nucleus_area_px * self.pixel_size_um**2


def polygon_circularity(vertices: np.ndarray) -> float:
    """4 pi A / P^2 of a closed polygon given as (n, 2) vertices; 1 for a circle."""
    a, b = vertices, np.roll(vertices, -1, axis=0)
    area = 0.5 * abs(float(np.sum(a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1])))
    perimeter = float(np.sum(np.hypot(*(b - a).T)))
    return 4 * math.pi * area / perimeter**2 if perimeter > 0 else 0.0


def mask_eccentricity(mask: np.ndarray) -> float:
    """Eccentricity of the ellipse with the mask's second moments (0 circle, -> 1 line)."""
    rows, cols = np.nonzero(mask)
    if len(rows) < 2:
        return 1.0
    cov = np.cov(np.stack([rows, cols]).astype(np.float64), bias=True)
    small, large = np.linalg.eigvalsh(cov)
    return float(math.sqrt(max(0.0, 1 - small / large))) if large > 0 else 0.0


def nucleus_mask(
    basophilic: np.ndarray,
    cell: np.ndarray,
    closing_px: int = CLOSING_PX,
    min_level: float = 0.0,
    share: np.ndarray | None = None,
) -> np.ndarray:
    """Otsu on the basophilic concentration inside ``cell``, closed, kept inside the cell.

    Empty when the Otsu level is below ``min_level``: then even the darkest part of
    the object is not a nucleus (a red cell or debris), whatever the split. With
    ``share`` (``stain.basophilic_and_share``), only pixels where the basophilic stain makes
    up at least ``NUCLEUS_MIN_SHARE`` of the staining: the darker rim of a red cell is
    eosin, however its faint basophilic part splits.
    """
    values = basophilic[cell]
    if values.size < 2 or float(np.ptp(values)) <= 0:
        return np.zeros_like(cell)
    level = threshold_otsu(values)
    if level < min_level:
        return np.zeros_like(cell)
    nucleus = (basophilic > level) & cell
    if share is not None:
        nucleus &= share >= NUCLEUS_MIN_SHARE
    footprint = np.ones((closing_px, closing_px), bool)
    # Pad so that the closing does not treat the bounding box edge as background.
    padded = np.pad(nucleus, closing_px)
    closed = ndimage.binary_closing(padded, footprint)[
        closing_px:-closing_px, closing_px:-closing_px
    ]
    return closed & cell


def weighted_centroid(weights: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(row, col) centre of mass of ``weights`` over ``mask``; the mask's centre if all zero."""
    rows, cols = np.nonzero(mask)
    w = np.maximum(weights[rows, cols].astype(np.float64), 0)
    if w.sum() <= 0:
        return float(rows.mean()), float(cols.mean())
    return float((rows * w).sum() / w.sum()), float((cols * w).sum() / w.sum())


def crop_patch(
    image: np.ndarray, row: float, col: float, side: int, fill: Sequence[float] | np.ndarray
) -> np.ndarray:
    """``side`` x ``side`` uint8 crop centred on (row, col), ``fill`` beyond the image."""
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.asarray(fill, np.float64).round().clip(0, 255).astype(np.uint8)
    top, left = round(row - side / 2), round(col - side / 2)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, image.shape[0]), min(left + side, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1, :3]
    return out


def background_colour(image: np.ndarray) -> np.ndarray:
    """Glass colour of a tile: the median of its brightest 2 % of pixels."""
    pixels = image.reshape(-1, image.shape[-1])[:, :3].astype(np.float32)
    brightness = pixels.sum(axis=1)
    bright = pixels[brightness >= np.percentile(brightness, 98)]
    return np.median(bright, axis=0)


def measure_cells(
    detections: Detections,
    image: np.ndarray,
    basophilic: np.ndarray,
    filters: CellFilters,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    tile_id: int = 0,
    background: Sequence[float] | np.ndarray | None = None,
    min_basophilic: float = 0.0,
    basophilic_share: np.ndarray | None = None,
) -> list[Cell]:
    """Objects of one tile that pass the filters, with nucleus, centre and patch.

    ``image`` is the (stain-normalised) RGB tile the detections come from,
    ``basophilic`` its basophilic concentration (H, W); ``filters`` must already be
    at the tile's pixel size (``CellFilters.at``); ``origin`` = slide (x, y) of
    the tile's pixel (0, 0); ``background`` = the padding colour of patches (the
    tile's glass when None); an object whose basophilic Otsu level is below
    ``min_basophilic`` has no nucleus and is dropped (``nucleus_mask``), and so is one
    whose nucleus, with ``basophilic_share`` (H, W), is not mostly basophilic.
    """
    if image.shape[:2] != basophilic.shape:
        raise CellError(f"image {image.shape[:2]} and basophilic {basophilic.shape} differ")
    if basophilic_share is not None and basophilic_share.shape != basophilic.shape:
        raise CellError(f"share {basophilic_share.shape} and basophilic {basophilic.shape} differ")
    fill = background_colour(image) if background is None else np.asarray(background)
    ox, oy = origin
    height, width = basophilic.shape
    kept = []
    for vertices, confidence in zip(detections.polygons(), detections.prob, strict=True):
        if confidence <= filters.min_confidence:
            continue
        rr, cc = draw_polygon(vertices[:, 0], vertices[:, 1], (height, width))
        area = len(rr)
        if area < filters.min_object_px or not filters.min_area_px <= area <= filters.max_area_px:
            continue
        circularity = polygon_circularity(vertices[:, ::-1])
        if circularity <= filters.min_circularity:
            continue
        r0, c0 = rr.min(), cc.min()
        mask = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), bool)
        mask[rr - r0, cc - c0] = True
        eccentricity = mask_eccentricity(mask)
        if eccentricity >= filters.max_eccentricity:
            continue
        box = slice(r0, r0 + mask.shape[0]), slice(c0, c0 + mask.shape[1])
        baso = basophilic[box]
        share = None if basophilic_share is None else basophilic_share[box]
        nucleus = nucleus_mask(baso, mask, filters.closing_px, min_basophilic, share)
        ratio = float(nucleus.sum()) / area
        if not nucleus.any() or not filters.min_nucleus_ratio <= ratio <= filters.max_nucleus_ratio:
            continue
        row, col = weighted_centroid(baso, nucleus)
        row, col = row + r0, col + c0
        kept.append(
            Cell(
                x=ox + col,
                y=oy + row,
                polygon=(vertices[:, ::-1] + np.array([ox, oy])).astype(np.float32),
                area_px=float(area),
                nucleus_area_px=float(nucleus.sum()),
                nc_ratio=ratio,
                circularity=circularity,
                eccentricity=eccentricity,
                confidence=float(confidence),
                tile_id=tile_id,
                pixel_size_um=filters.pixel_size_um,
                patch=crop_patch(image, row, col, filters.patch_px, fill),
            )
        )
    return kept


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (size, size, 3), bilinear (what the encoder's input is made with)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def encoder_patches(cells: Sequence[Cell], size: int = ENCODER_INPUT_PX) -> np.ndarray:
    """uint8 (N, size, size, 3): each cell's patch resized bilinearly for the encoder."""
    out = np.empty((len(cells), size, size, 3), np.uint8)
    for index, cell in enumerate(cells):
        if cell.patch is None:
            raise CellError(f"cell {index} has no patch")
        out[index] = resize_bilinear(cell.patch, size)
    return out


# --- tables ------------------------------------------------------------------------


def _wkt(polygon: np.ndarray, scale: float) -> str:
    ring = [*polygon, polygon[0]]
    return "POLYGON ((" + ", ".join(f"{x * scale:.1f} {y * scale:.1f}" for x, y in ring) + "))"


def cells_csv(
    cells: Sequence[Cell], level0_scale: float = 1.0, fields: Sequence[str] | None = None
) -> str:
    """The per-cell table as CSV text; ``cell_id`` is the cell's index in ``cells``.

    Coordinates are multiplied by ``level0_scale`` (analysis pixel size / level-0
    pixel size) so that they are level-0 slide pixels, as in the GeoJSON.
    ``fields``: the photo each cell is on (a field folder), added as a last column.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS if fields is None else (*CSV_COLUMNS, "field"))
    for index, c in enumerate(cells):
        writer.writerow(
            [
                index,
                f"{c.x * level0_scale:.1f}",
                f"{c.y * level0_scale:.1f}",
                f"{c.area_um2:.2f}",
                f"{c.nucleus_area_um2:.2f}",
                f"{c.nc_ratio:.4f}",
                f"{c.circularity:.4f}",
                f"{c.eccentricity:.4f}",
                f"{c.confidence:.4f}",
                c.tile_id,
                _wkt(c.polygon, level0_scale),
                *(() if fields is None else (fields[index],)),
            ]
        )
    return out.getvalue()


def cells_geojson(
    cells: Sequence[Cell], level0_scale: float = 1.0, fields: Sequence[str] | None = None
) -> dict[str, Any]:
    """QuPath-importable FeatureCollection: one detection per cell, polygon in level-0 pixels.

    ``fields``: the photo each cell is on (a field folder), as a ``field`` property.
    """
    features = []
    for index, c in enumerate(cells):
        ring = [
            [round(float(x) * level0_scale, 1), round(float(y) * level0_scale, 1)]
            for x, y in c.polygon
        ]
        measurements = {
            "cell_id": index,
            "centroid_x": round(c.x * level0_scale, 1),
            "centroid_y": round(c.y * level0_scale, 1),
            "area_um2": round(c.area_um2, 2),
            "nucleus_area_um2": round(c.nucleus_area_um2, 2),
            "nc_ratio": round(c.nc_ratio, 4),
            "circularity": round(c.circularity, 4),
            "eccentricity": round(c.eccentricity, 4),
            "confidence": round(c.confidence, 4),
            "tile_id": c.tile_id,
        }
        features.append(
            {
                "type": "Feature",
                "id": f"cell-{index}",
                "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": CLASSIFICATION},
                    "measurements": measurements,
                    **({} if fields is None else {"field": fields[index]}),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


@dataclass(frozen=True)
class CellCallLabels:
    """The cell head's call of each row of a cell table, as the tables show it."""

    names: Sequence[str]  # class key per cell
    labels: Sequence[str]  # what a person reads
    colours: Sequence[tuple[int, int, int]]
    confidence: np.ndarray  # (N,) calibrated
    sure: np.ndarray  # (N,) bool: at or above the operating point


def _row_values(rows: int, values: np.ndarray | Sequence[Any], what: str) -> None:
    if len(values) != rows:
        raise CellError(f"{len(values)} {what} for {rows} cells")


def csv_with_calls(
    table_csv: str, attention: np.ndarray | None, calls: CellCallLabels | None = None
) -> str:
    """A cell table with ``attention`` (blank for a cell outside the heads' bag, NaN) and,
    with a cell head, ``cell_class``, ``class_confidence`` and ``class_sure`` columns
    added row by row (unchanged when both are None)."""
    if (attention is None and calls is None) or not table_csv:
        return table_csv
    header, *rows = csv.reader(io.StringIO(table_csv))
    extra = []
    if attention is not None:
        _row_values(len(rows), attention, "attention values")
        extra.append("attention")
    if calls is not None:
        _row_values(len(rows), calls.names, "cell classes")
        extra += ["cell_class", "class_confidence", "class_sure"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*header, *extra])
    for index, row in enumerate(rows):
        values = []
        if attention is not None:
            value = float(attention[index])
            values.append("" if np.isnan(value) else f"{value:.6g}")
        if calls is not None:
            values += [
                calls.names[index],
                f"{float(calls.confidence[index]):.4f}",
                "1" if calls.sure[index] else "0",
            ]
        writer.writerow([*row, *values])
    return out.getvalue()


def geojson_with_calls(
    collection: Mapping[str, Any],
    slide_id: str,
    attention: np.ndarray | None,
    calls: CellCallLabels | None = None,
) -> dict[str, Any]:
    """The slide's detections named with ``slide`` and, when given, each cell's attention
    (none for a cell outside the heads' bag, NaN) and the cell head's call: QuPath's
    ``classification`` {name, color} of its class, or *Unsure* below the operating
    point, with the class and its confidence among the measurements.

    A collection without features (a single-cell folder has no geometry) stays empty.
    """
    source = list(collection.get("features") or [])
    if source and attention is not None:
        _row_values(len(source), attention, "attention values")
    if source and calls is not None:
        _row_values(len(source), calls.names, "cell classes")
    features = []
    for index, feature in enumerate(source):
        properties = dict(feature.get("properties") or {})
        measurements = dict(properties.get("measurements") or {})
        if attention is not None and not np.isnan(attention[index]):
            measurements["attention"] = float(attention[index])
        if calls is not None:
            sure = bool(calls.sure[index])
            measurements["class_confidence"] = round(float(calls.confidence[index]), 4)
            properties["predicted_class"] = calls.names[index]
            properties["classification"] = {
                "name": calls.labels[index] if sure else UNSURE,
                "color": list(calls.colours[index] if sure else UNSURE_RGB),
            }
        properties["measurements"] = measurements
        properties["slide"] = slide_id
        features.append({**feature, "properties": properties})
    return {"type": "FeatureCollection", "features": features}
