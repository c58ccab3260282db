"""Quality control per tile (or camera field) and per slide (METHOD.md A, "Automated QC").

docs/qc.md says how each threshold is defined and measured. Per 200 x 200 um
tile (its core, at 0.25 um/px), or per field photo of a field folder:
- *blurred*: variance of the 4-neighbour Laplacian of the grey image (0-255),
  with the image resampled (area average) to ``blur_um_per_px`` first, below
  ``laplacian_min``. Judged at a fixed physical scale that every accepted input
  resolves, a 20x scan (0.5 um/px) and a 100x camera field (0.07 um/px) are
  held to the same standard. A bundle without ``blur_um_per_px`` was written
  for the working grid itself (0.25 um/px, ``laplacian_min`` 100) and keeps
  that meaning; bundles written now say 0.5 um/px and 35
  (``runtime.bundle_format.QcSpec.current``);
- *intensity outlier*: mean intensity outside the bundle reference's
  [p5, p95] of per-tile mean intensity: above is *too faint*, below *too dark*.
  With ``intensity_relative_to_glass`` (bundles written now) the mean is first
  scaled by the reference's glass luminance over the slide's (the stain
  estimate's ``background``), so that a brighter lamp or camera exposure is not
  read as paler staining; a camera field, white-balanced to the reference's
  glass, is then judged exactly like a scan's tile;
- *low cellularity*: fewer than ``min_nuclei_per_tile`` (5) nuclei, counted as
  connected components of Otsu's threshold on the basophilic concentration
  (components smaller than ``min_nucleus_um2`` are noise; a threshold below
  ``min_basophilic`` means there is no nucleus at all).

A camera field is judged after white balance from its own glass, and also for
its exposure and colour (``exposure`` on the photo as taken):
- *underexposed*: glass luminance below ``MIN_GLASS_LUMINANCE`` (100);
- *overexposed*: more than ``MAX_CLIPPED_FRACTION`` (25 %) of pixels with a
  channel at 255 (burnt out: colours are lost, not shifted);
- *colour cast*: the glass's weakest channel under ``MIN_CAST_RATIO`` (0.5) of
  its strongest (a milder cast is what the white balance corrects).
A field's cellularity is not judged alone (a blood field often holds one white
cell or none): nuclei are counted per field and judged per area over the slide.

Slide verdict over the cellular zone (each tile is an equal share of it) or
over the fields:
- fail: no tile in the zone; more than ``max_artefact_fraction`` (20 %) of
  tiles (fields) blurred, too faint, too dark, under- or overexposed, with a
  colour cast, or artefacts together; at least ``blank_fraction`` (95 %) of
  tiles with low cellularity (blank slide); fields: fewer nuclei per mm2 over
  all fields than ``1 - blank_fraction`` of the density ``min_nuclei_per_tile``
  means per tile (125 per mm2, so under 6 per mm2);
- warn: any of those fractions above half its fail limit, or more than half
  the tiles with low cellularity; fields: fewer than 125 nuclei per mm2;
- pass otherwise.
Reasons are short sentences with percentages, e.g. "71 % of tiles blurred".
The authors' "plasma cells < 10 %" exclusion needs cell classes and is not
judged here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from appliance.pipeline.stain import (
    StainEstimate,
    basophilic,
    luminance,
    mean_intensity,
    reference_stains,
)
from appliance.results.schema import QcRecord
from runtime.bundle_format import QcSpec, StainReference

_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
PASS, WARN, FAIL = "pass", "warn", "fail"
MIN_GLASS_LUMINANCE = 100.0
MAX_CLIPPED_FRACTION = 0.25
MIN_CAST_RATIO = 0.5


@dataclass(frozen=True)
class QCParams:
    """The bundle's ``qc`` section plus the reference's intensity range."""

    laplacian_min: float = 100.0
    min_nuclei_per_tile: int = 5
    intensity_p5: float = 0.0
    intensity_p95: float = 255.0
    max_artefact_fraction: float = 0.2
    blank_fraction: float = 0.95
    min_nucleus_um2: float = 8.0
    min_basophilic: float = 0.12
    pixel_size_um: float = 0.25  # of the images judged (the working grid)
    blur_um_per_px: float = 0.25  # where blur is judged; absent from a bundle: the working grid
    tile_um: float = 200.0
    reference_glass: float = 0.0  # luminance; > 0: intensities relative to the slide's glass

    @property
    def min_nuclei_per_mm2(self) -> float:
        """The density ``min_nuclei_per_tile`` stands for: per area, as fields are judged."""
        return self.min_nuclei_per_tile / (self.tile_um / 1000.0) ** 2

    @classmethod
    def of(cls, qc: QcSpec, reference: StainReference | None) -> QCParams:
        """The bundle's ``qc`` section with its stain reference's intensity range (and
        glass, when intensities are judged relative to it)."""
        values: dict[str, Any] = {
            "laplacian_min": qc.laplacian_min,
            "min_nuclei_per_tile": qc.min_nuclei_per_tile,
            "max_artefact_fraction": qc.max_artefact_fraction,
            "blur_um_per_px": qc.blur_um_per_px,
            "tile_um": qc.tile_um,
        }
        if reference is not None:
            values["intensity_p5"] = reference.intensity_p5
            values["intensity_p95"] = reference.intensity_p95
            if qc.intensity_relative_to_glass:
                values["reference_glass"] = luminance(reference_stains(reference).background)
        return cls(**values)


@dataclass(frozen=True)
class Exposure:
    """How a camera field was taken: its glass colour and the share of burnt-out pixels."""

    glass: tuple[float, float, float]  # RGB, the median of the brightest 2 %
    clipped_fraction: float

    @property
    def luminance(self) -> float:
        return luminance(self.glass)

    @property
    def cast_ratio(self) -> float:
        """Weakest over strongest glass channel: 1 for neutral glass."""
        return min(self.glass) / max(max(self.glass), 1.0)


@dataclass(frozen=True)
class TileQC:
    """One tile's (or field's) QC; a field's cellularity is judged per area, never alone."""

    tile_id: int
    laplacian_var: float
    mean_intensity: float
    n_nuclei: int
    blurred: bool
    too_faint: bool
    too_dark: bool
    low_cellularity: bool
    area_mm2: float = 0.0
    underexposed: bool = False
    overexposed: bool = False
    colour_cast: bool = False

    @property
    def intensity_outlier(self) -> bool:
        return self.too_faint or self.too_dark

    @property
    def artefact(self) -> bool:
        return (
            self.blurred
            or self.intensity_outlier
            or self.underexposed
            or self.overexposed
            or self.colour_cast
        )

    @property
    def ok(self) -> bool:
        return not (self.artefact or self.low_cellularity)


@dataclass(frozen=True)
class SlideQC:
    """The slide's verdict over its tiles."""

    verdict: str  # pass | warn | fail
    reasons: list[str]
    fractions: dict[str, float]  # blurred, too_faint, too_dark, artefact, low_cellularity, ...
    n_tiles: int  # tiles judged (0 for a field folder: ScanRecord.fields counts its fields)
    nuclei_per_mm2: float | None = None

    def record(self) -> QcRecord:
        """The verdict as result.json keeps it (``scans[].qc``)."""
        return QcRecord(
            verdict=self.verdict,  # type: ignore[arg-type]
            reasons=tuple(self.reasons),
            fractions={k: round(v, 4) for k, v in self.fractions.items()},
            n_tiles=self.n_tiles,
            nuclei_per_mm2=None if self.nuclei_per_mm2 is None else round(self.nuclei_per_mm2, 1),
        )


def laplacian_variance(rgb: np.ndarray) -> float:
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(ndimage.convolve(grey, _LAPLACIAN, mode="reflect").var())


def at_scale(rgb: np.ndarray, pixel_size_um: float, um_per_px: float) -> np.ndarray:
    """``rgb`` (at ``pixel_size_um``) resampled to ``um_per_px``: area average when
    shrinking (what a coarser sensor pixel sees), bilinear when enlarging."""
    if abs(pixel_size_um - um_per_px) < 1e-9:
        return rgb
    scale = pixel_size_um / um_per_px
    height, width = rgb.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, method))


def sharpness(rgb: np.ndarray, params: QCParams) -> float:
    """The blur measure: Laplacian variance at the bundle's ``blur_um_per_px``."""
    return laplacian_variance(at_scale(rgb, params.pixel_size_um, params.blur_um_per_px))


def exposure(rgb: np.ndarray) -> Exposure:
    """A photo's glass colour and burnt-out share, before any white balance."""
    pixels = rgb.reshape(-1, 3)
    luminance = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    glass = np.median(pixels[luminance >= np.percentile(luminance, 98)], axis=0)
    clipped = float((pixels.max(axis=1) >= 255).mean())
    return Exposure((float(glass[0]), float(glass[1]), float(glass[2])), clipped)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a float array (histogram over its own range)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    between = (mean[-1] * weight / total - mean) ** 2 / (weight * (total - weight) / total + 1e-12)
    return float(centres[int(np.argmax(between[:-1]))])


def count_nuclei(rgb: np.ndarray, stains: StainEstimate, params: QCParams) -> int:
    """Nucleated cells in a tile: Otsu on the basophilic channel, then connected components."""
    baso = basophilic(rgb, stains)
    threshold = max(otsu_threshold(baso), params.min_basophilic)
    labels, n = ndimage.label(baso > threshold)
    if n == 0:
        return 0
    min_px = params.min_nucleus_um2 / params.pixel_size_um**2
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= min_px).sum())


def assess_tile(tile_id: int, rgb: np.ndarray, stains: StainEstimate, params: QCParams) -> TileQC:
    """QC of one tile core (uint8 RGB at 0.25 um/px)."""
    lap = sharpness(rgb, params)
    intensity = mean_intensity(rgb)
    if params.reference_glass > 0:
        intensity *= params.reference_glass / max(luminance(stains.background), 1.0)
    nuclei = count_nuclei(rgb, stains, params)
    return TileQC(
        tile_id=tile_id,
        laplacian_var=round(lap, 3),
        mean_intensity=round(intensity, 3),
        n_nuclei=nuclei,
        blurred=lap < params.laplacian_min,
        too_faint=intensity > params.intensity_p95,
        too_dark=intensity < params.intensity_p5,
        low_cellularity=nuclei < params.min_nuclei_per_tile,
        area_mm2=rgb.shape[0] * rgb.shape[1] * (params.pixel_size_um / 1000.0) ** 2,
    )


def assess_field(
    field_id: int, rgb: np.ndarray, taken: Exposure, stains: StainEstimate, params: QCParams
) -> TileQC:
    """QC of one camera field: ``rgb`` white-balanced at the working grid, ``taken`` its
    exposure as photographed. Its cellularity counts towards the slide's density only."""
    judged = assess_tile(field_id, rgb, stains, params)
    return dataclasses.replace(
        judged,
        low_cellularity=False,
        underexposed=taken.luminance < MIN_GLASS_LUMINANCE,
        overexposed=taken.clipped_fraction > MAX_CLIPPED_FRACTION,
        colour_cast=taken.cast_ratio < MIN_CAST_RATIO,
    )


def _percent(fraction: float) -> str:
    return f"{round(fraction * 100)} %"


def slide_verdict(tiles: Iterable[TileQC], params: QCParams, unit: str = "tiles") -> SlideQC:
    """Pass / warn / fail for the slide from its tiles' (or fields') QC (module docstring).

    ``unit`` is "tiles" for a scan's cellular zone, "fields" for a field folder,
    whose cellularity is judged per area over all its fields.
    """
    tiles = list(tiles)
    if not tiles:
        return SlideQC(FAIL, ["no cellular zone: no monolayer tile with cells found"], {}, 0)
    n = len(tiles)

    def share(flag: str) -> float:
        return sum(bool(getattr(t, flag)) for t in tiles) / n

    flags = ["blurred", "too_faint", "too_dark"]
    if unit == "fields":
        flags += ["underexposed", "overexposed", "colour_cast"]
    fractions = {name: share(name) for name in (*flags, "artefact", "low_cellularity")}
    area = sum(t.area_mm2 for t in tiles)
    density = sum(t.n_nuclei for t in tiles) / area if area > 0 else None
    limit = params.max_artefact_fraction
    messages = {
        "blurred": f"of {unit} blurred",
        "too_faint": f"of {unit} too faint (staining paler than the reference)",
        "too_dark": f"of {unit} too dark (staining darker than the reference)",
        "underexposed": f"of {unit} underexposed (the glass is dark: more light or exposure)",
        "overexposed": f"of {unit} overexposed (burnt out: less light or exposure)",
        "colour_cast": f"of {unit} with a strong colour cast (set the camera's white balance)",
        "artefact": (
            "of the cellular zone with artefacts (blur or staining)"
            if unit == "tiles"
            else "of fields with artefacts (blur, staining or exposure)"
        ),
    }
    fails, warns = [], []
    for name in (*flags, "artefact"):
        value = fractions[name]
        if value > limit:
            fails.append(f"{_percent(value)} {messages[name]}")
        elif value > limit / 2:
            warns.append(f"{_percent(value)} {messages[name]}")
    if fails and fractions["artefact"] > limit and len(fails) > 1:
        fails = [f for f in fails if "artefacts" not in f]  # the specific causes say it
    if unit == "fields":
        wanted = params.min_nuclei_per_mm2
        found = f"{round(density or 0.0)} nuclei per mm2 over {n} field{'' if n == 1 else 's'}"
        if (density or 0.0) < wanted * (1 - params.blank_fraction):
            fails.append(f"blank slide: {found} (no nucleated cells to analyse)")
        elif (density or 0.0) < wanted:
            warns.append(f"low cellularity: {found} (fewer than {round(wanted)})")
    else:
        low = fractions["low_cellularity"]
        below = f"fewer than {params.min_nuclei_per_tile} nuclei"
        if low >= params.blank_fraction:
            fails.append(f"blank slide: {_percent(low)} of tiles have {below}")
        elif low > 0.5:
            warns.append(f"low cellularity: {_percent(low)} of tiles have {below}")
    verdict = FAIL if fails else (WARN if warns else PASS)
    return SlideQC(verdict, fails + warns, fractions, n if unit == "tiles" else 0, density)
