"""Quality control per tile and per slide (METHOD.md A, "Automated QC").

Per 200 x 200 um tile (its core, at 0.25 um/px):
- *blurred*: variance of the 4-neighbour Laplacian of the grey image (0-255)
  below ``laplacian_min`` (100);
- *intensity outlier*: mean intensity outside the bundle reference's
  [p5, p95] of per-tile mean intensity: above is *too faint*, below *too dark*;
- *low cellularity*: fewer than ``min_nuclei_per_tile`` (5) nuclei, counted as
  connected components of Otsu's threshold on the basophilic concentration
  (components smaller than ``min_nucleus_um2`` are noise; a threshold below
  ``min_basophilic`` means there is no nucleus at all).

Slide verdict over the cellular zone (each tile is an equal share of it):
- fail: no tile in the zone; more than ``max_artefact_fraction`` (20 %) of
  tiles blurred, too faint, too dark, or artefacts together (blurred or
  intensity outlier); at least ``blank_fraction`` (95 %) of tiles with low
  cellularity (blank slide);
- warn: any of those fractions above half its fail limit, or more than half
  the tiles with low cellularity;
- pass otherwise.
Reasons are short sentences with percentages, e.g. "71 % of tiles blurred".
The authors' "plasma cells < 10 %" exclusion needs cell classes and is not
judged here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.results.schema import QcRecord

from .stain import StainEstimate, StainReference, basophilic, mean_intensity

_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
PASS, WARN, FAIL = "pass", "warn", "fail"


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
    pixel_size_um: float = 0.25

    @classmethod
    def from_bundle(cls, qc: dict[str, Any], reference: StainReference | None) -> QCParams:
        """From ``bundle.json``'s ``qc`` section (unknown keys ignored) and stain reference."""
        names = {f for f in cls.__dataclass_fields__ if f not in ("intensity_p5", "intensity_p95")}
        values: dict[str, Any] = {k: v for k, v in qc.items() if k in names}
        if reference is not None:
            values["intensity_p5"] = reference.intensity_p5
            values["intensity_p95"] = reference.intensity_p95
        return cls(**values)


@dataclass(frozen=True)
class TileQC:
    tile_id: int
    laplacian_var: float
    mean_intensity: float
    n_nuclei: int
    blurred: bool
    too_faint: bool
    too_dark: bool
    low_cellularity: bool

    @property
    def intensity_outlier(self) -> bool:
        return self.too_faint or self.too_dark

    @property
    def artefact(self) -> bool:
        return self.blurred or self.intensity_outlier

    @property
    def ok(self) -> bool:
        return not (self.artefact or self.low_cellularity)


@dataclass(frozen=True)
class SlideQC:
    """The slide's verdict over its tiles."""

    verdict: str  # pass | warn | fail
    reasons: list[str]
    fractions: dict[str, float]  # blurred, too_faint, too_dark, artefact, low_cellularity
    n_tiles: int

    def record(self) -> QcRecord:
        """The verdict as result.json keeps it (``scans[].qc``)."""
        return QcRecord(
            verdict=self.verdict,  # type: ignore[arg-type]
            reasons=tuple(self.reasons),
            fractions={k: round(v, 4) for k, v in self.fractions.items()},
            n_tiles=self.n_tiles,
        )


def laplacian_variance(rgb: np.ndarray) -> float:
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(ndimage.convolve(grey, _LAPLACIAN, mode="reflect").var())


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
    lap = laplacian_variance(rgb)
    intensity = mean_intensity(rgb)
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
    )


def _percent(fraction: float) -> str:
    return f"{round(fraction * 100)} %"


def slide_verdict(tiles: Iterable[TileQC], params: QCParams) -> SlideQC:
    """Pass / warn / fail for the slide from its tiles' QC (rules in the module docstring)."""
    tiles = list(tiles)
    if not tiles:
        return SlideQC(FAIL, ["no cellular zone: no monolayer tile with cells found"], {}, 0)
    n = len(tiles)

    def share(flag: str) -> float:
        return sum(bool(getattr(t, flag)) for t in tiles) / n

    fractions = {
        name: share(name)
        for name in ("blurred", "too_faint", "too_dark", "artefact", "low_cellularity")
    }
    limit = params.max_artefact_fraction
    messages = {
        "blurred": "of tiles blurred",
        "too_faint": "of tiles too faint (staining paler than the reference)",
        "too_dark": "of tiles too dark (staining darker than the reference)",
        "artefact": "of the cellular zone with artefacts (blur or staining)",
    }
    fails, warns = [], []
    for name, text in messages.items():
        value = fractions[name]
        if value > limit:
            fails.append(f"{_percent(value)} {text}")
        elif value > limit / 2:
            warns.append(f"{_percent(value)} {text}")
    if fails and fractions["artefact"] > limit and len(fails) > 1:
        fails = [f for f in fails if "artefacts" not in f]  # the specific causes say it
    low = fractions["low_cellularity"]
    below = f"fewer than {params.min_nuclei_per_tile} nuclei"
    if low >= params.blank_fraction:
        fails.append(f"blank slide: {_percent(low)} of tiles have {below}")
    elif low > 0.5:
        warns.append(f"low cellularity: {_percent(low)} of tiles have {below}")
    verdict = FAIL if fails else (WARN if warns else PASS)
    return SlideQC(verdict, fails + warns, fractions, n)
