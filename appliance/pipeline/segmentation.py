"""StarDist segmentation on a tile: the network through the runtime, NMS from stardist.

Input: RGB (the StarDist H&E / SegPC convention; a model with one input channel
gets the grey level instead). Normalisation is the bundle's: by default the
1st and 99.8th percentile of the tile, jointly over the channels, mapped to 0
and 1 (what csbdeep's ``normalize`` does for StarDist's RGB models). The same
function normalises the tiles the demo network is trained on.

The rest mirrors StarDist's own ``predict_instances`` (sparse mode, one tile):
reflect-pad at the end of each axis to a multiple of ``div_by`` (grid x 2^depth),
run the network, clip distances at 1e-3, keep grid cells with prob above the
threshold away from a 2-cell border, drop candidates in the padding, then
star-convex NMS and polygons from ``stardist.nms`` / ``stardist.geometry``
(pure numpy + C: no TensorFlow is loaded; tests/test_layering.py checks it). The
NMS starts from the local maxima of the probability grid and takes in only the
candidates the objects it keeps do not clearly suppress (``star_nms.suppress``),
held to what stardist's NMS on every candidate keeps by the detection-parity rule.

Tiles overlap; a cell whose StarDist centre lies in a tile's *core* (the tile
minus half the overlap on each inner side) belongs to that tile only, so a cell
on a seam is counted once. The overlap must exceed the largest cell's diameter
for the neighbour to see the whole of a cell it keeps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appliance.pipeline import star_nms
from runtime.backends import RuntimeSettings, open_model
from runtime.bundle_format import SegmenterSpec, segmenter_variants
from runtime.typed_json import SpecError, parse_section

SEGMENTER_FILE = "segmenter.onnx"
INPUT_NAME = "input"
DEFAULT_NORMALISATION: dict[str, Any] = {"kind": "percentile", "low": 1.0, "high": 99.8}
DIST_MIN = 1e-3  # StarDist's own floor on predicted distances
BORDER_CELLS = 2  # candidates this close (in grid cells) to the tile edge are dropped
PEAK_CELLS = 3  # NMS starts from the grid cells whose prob is the highest of this square
log = logging.getLogger(__name__)


class SegmentationError(ValueError):
    """A segmenter specification or input that cannot be used; one line."""


class Network(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def segmenter_spec(section: SegmenterSpec | Mapping[str, Any]) -> SegmenterSpec:
    """The bundle's ``segmenter`` section (``runtime.bundle_format.SegmenterSpec``, which is
    the authority on it, or the JSON object it is parsed from), checked, with the
    default normalisation filled in."""
    try:
        if isinstance(section, SegmenterSpec):
            spec = section
            spec.validate("segmenter")
        else:
            spec = parse_section(SegmenterSpec, {"file": SEGMENTER_FILE, **section}, "segmenter")
    except SpecError as exc:
        raise SegmentationError(str(exc)) from None
    normalisation = dict(spec.normalisation or DEFAULT_NORMALISATION)
    normalise(np.zeros((4, 4, 3), np.uint8), normalisation)  # an unusable one raises here
    return replace(spec, normalisation=normalisation)


def normalise(image: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Tile (H, W, C) -> float32 as the network was trained on (see module docstring)."""
    kind = spec.get("kind")
    x = np.asarray(image, dtype=np.float32)
    if kind == "percentile":
        low, high = float(spec.get("low", 1.0)), float(spec.get("high", 99.8))
        if not 0 <= low < high <= 100:
            raise SegmentationError("normalisation percentiles must be 0 <= low < high <= 100")
        lo, hi = np.percentile(x, (low, high))
        return (x - np.float32(lo)) / np.float32(hi - lo + 1e-20)
    if kind == "scale":
        return x * np.float32(spec.get("factor", 1 / 255))
    raise SegmentationError(f"unknown normalisation kind {kind!r} (percentile or scale)")


def network_input(image: np.ndarray, spec: SegmenterSpec) -> np.ndarray:
    """RGB uint8 tile -> normalised (H, W, C) float32 with the channels the network takes."""
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SegmentationError(
            f"segmentation needs an RGB tile (H, W, 3), got shape {image.shape}"
        )
    rgb = image[..., :3]
    if spec.input_channels == 1:
        rgb = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        rgb = rgb[..., None]
    return normalise(rgb, spec.normalisation)


@dataclass(frozen=True)
class Detections:
    """Star-convex objects of one tile, in tile pixel coordinates (row, column)."""

    points: np.ndarray  # (N, 2) int, the StarDist centre of each object
    dist: np.ndarray  # (N, n_rays) float32, ray lengths in pixels
    prob: np.ndarray  # (N,) float32, object probability (the detection confidence)

    def __len__(self) -> int:
        return len(self.prob)

    def polygons(self) -> np.ndarray:
        """(N, n_rays, 2) float32 vertices (row, column)."""
        from stardist.geometry import dist_to_coord

        if not len(self):
            return np.zeros((0, self.dist.shape[1], 2), np.float32)
        return np.moveaxis(dist_to_coord(self.dist, self.points), 1, 2)

    def labels(self, shape: tuple[int, int]) -> np.ndarray:
        """Label image as StarDist renders it (higher probability drawn last)."""
        from stardist.geometry import polygons_to_label

        if not len(self):
            return np.zeros(shape, np.int32)
        return polygons_to_label(self.dist, self.points, prob=self.prob, shape=shape)

    def select(self, keep: np.ndarray) -> Detections:
        return Detections(self.points[keep], self.dist[keep], self.prob[keep])


class Segmenter:
    """Runs one segmentation network on tiles; thread counts follow the runtime's."""

    def __init__(
        self,
        network: Network,
        spec: SegmenterSpec | Mapping[str, Any],
        threads: int = 0,
        variant: str = "fp32",
        *,
        every_candidate: bool = False,
    ) -> None:
        self.network = network
        self.spec = segmenter_spec(spec)
        self.threads = threads
        self.variant = variant  # the file the backend loaded: fp32 | int8
        # True: stardist's NMS over every candidate, the reference star_nms is held to.
        self.every_candidate = every_candidate

    @classmethod
    def open(
        cls,
        bundle_dir: Path,
        section: SegmenterSpec | Mapping[str, Any],
        settings: RuntimeSettings | None = None,
    ) -> Segmenter:
        """The bundle's segmenter on the backend ``settings`` choose, with the file that
        backend prefers (its int8 network on ONNX Runtime's CPU when the section lists
        one, fp32 otherwise)."""
        settings = settings or RuntimeSettings()
        spec = segmenter_spec(section)
        variants = segmenter_variants(Path(bundle_dir), spec)
        for path in (variants.fp32, variants.int8):
            if path is not None and not path.is_file():
                raise SegmentationError(f"{path}: segmenter network not found")
        model = open_model(variants, settings)
        return cls(model, spec, settings.threads, model.variant)

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """prob (h, w) and dist (h, w, n_rays) on the grid of the *padded* tile."""
        x = network_input(image, self.spec)
        pad = [(0, (-s) % d) for s, d in zip(x.shape[:2], self.spec.div_by, strict=True)]
        x = np.pad(x, [*pad, (0, 0)], mode="reflect")
        out = self.network.run({INPUT_NAME: x[None]})
        prob, dist = out["prob"][0, ..., 0], out["dist"][0]
        if dist.shape[-1] != self.spec.n_rays:
            raise SegmentationError(
                f"network gives {dist.shape[-1]} rays, bundle says {self.spec.n_rays}"
            )
        return prob, np.maximum(dist, DIST_MIN)

    def detect(
        self, image: np.ndarray, core: tuple[int, int, int, int] | None = None
    ) -> Detections:
        """Objects of one RGB tile; with ``core`` = (row0, col0, row1, col1), only those
        whose centre lies in [row0, row1) x [col0, col1)."""
        from scipy import ndimage
        from stardist.nms import _ind_prob_thresh

        prob, dist = self.predict(image)
        candidates = _ind_prob_thresh(prob, self.spec.prob_thresh, b=BORDER_CELLS)
        points = np.argwhere(candidates) * np.asarray(self.spec.grid)
        inside = np.all(points < np.asarray(image.shape[:2]), axis=1)
        points = points[inside]
        if not len(points):
            return _empty(self.spec.n_rays)
        probs = prob[candidates][inside]
        dists = dist[candidates][inside]
        set_openmp_threads(self.threads)
        if self.every_candidate:
            kept = star_nms.suppress_all(points, probs, dists, self.spec.nms_thresh)
        else:
            peaks = prob >= ndimage.maximum_filter(prob, size=PEAK_CELLS, mode="nearest")
            seeds = peaks[candidates][inside]
            kept = star_nms.suppress(points, probs, dists, self.spec.nms_thresh, seeds)
        points, probs, dists = points[kept], probs[kept], dists[kept]
        found = Detections(
            points.astype(np.int64), dists.astype(np.float32), probs.astype(np.float32)
        )
        if core is None:
            return found
        row0, col0, row1, col1 = core
        p = found.points
        keep = (p[:, 0] >= row0) & (p[:, 0] < row1) & (p[:, 1] >= col0) & (p[:, 1] < col1)
        return found.select(keep)

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, Detections]:
        """Label image and detections of one tile (what ``predict_instances`` returns)."""
        found = self.detect(image)
        return found.labels(image.shape[:2]), found


def _empty(n_rays: int) -> Detections:
    return Detections(
        np.zeros((0, 2), np.int64), np.zeros((0, n_rays), np.float32), np.zeros(0, np.float32)
    )


def set_openmp_threads(threads: int) -> None:
    """Cap stardist's OpenMP NMS at ``threads`` (0: leave OpenMP's default).

    The setting is per calling thread in OpenMP, so it is applied before every call.
    """
    if threads > 0 and (omp := _openmp_library()) is not None:
        omp.omp_set_num_threads(ctypes.c_int(threads))


@functools.cache
def _openmp_library() -> Any:
    import stardist
    import stardist.lib.stardist2d  # loads the libgomp stardist was built with

    bundled = Path(stardist.__file__).resolve().parents[1] / "stardist.libs"
    candidates = sorted(bundled.glob("libgomp*.so*")) or [ctypes.util.find_library("gomp")]
    for candidate in candidates:
        if candidate:
            try:
                return ctypes.CDLL(str(candidate))
            except OSError:
                continue
    log.warning("OpenMP runtime of stardist not found; NMS uses OpenMP's default threads")
    return None


@dataclass(frozen=True)
class MatchCounts:
    """Instance matching of a prediction against ground truth at one IoU threshold."""

    true_positives: int
    false_positives: int
    false_negatives: int

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
        )

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self) -> float:
        present = self.true_positives + self.false_negatives
        return self.true_positives / present if present else 1.0

    @property
    def f1(self) -> float:
        total = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / total if total else 1.0


def match_instances(truth: np.ndarray, predicted: np.ndarray, iou: float = 0.5) -> MatchCounts:
    """Count one-to-one matches with IoU >= ``iou`` between two label images (0 = background).

    Pairs are taken greedily by decreasing IoU; at ``iou`` > 0.5 any matching pair is
    unique anyway, so greedy equals optimal there.
    """
    if truth.shape != predicted.shape:
        raise ValueError(f"label images differ in shape: {truth.shape} vs {predicted.shape}")
    t_ids, t = np.unique(truth.ravel(), return_inverse=True)
    p_ids, p = np.unique(predicted.ravel(), return_inverse=True)
    overlap = np.bincount(t * len(p_ids) + p, minlength=len(t_ids) * len(p_ids))
    overlap = overlap.reshape(len(t_ids), len(p_ids))
    # Drop the background row / column wherever label 0 is present.
    overlap = overlap[1:] if t_ids[0] == 0 else overlap
    overlap = overlap[:, 1:] if p_ids[0] == 0 else overlap
    n_true, n_pred = overlap.shape
    if not n_true or not n_pred:
        return MatchCounts(0, n_pred, n_true)
    t_area = np.bincount(t, minlength=len(t_ids))[len(t_ids) - n_true :]
    p_area = np.bincount(p, minlength=len(p_ids))[len(p_ids) - n_pred :]
    union = t_area[:, None] + p_area[None, :] - overlap
    scores = overlap / np.maximum(union, 1)
    rows, cols = np.nonzero(scores >= iou)
    order = np.argsort(-scores[rows, cols], kind="stable")
    used_t, used_p, matched = set(), set(), 0
    for r, c in zip(rows[order], cols[order], strict=True):
        if r not in used_t and c not in used_p:
            used_t.add(r)
            used_p.add(c)
            matched += 1
    return MatchCounts(matched, n_pred - matched, n_true - matched)


def match_detections(
    reference: Detections, candidate: Detections, shape: tuple[int, int], iou: float = 0.5
) -> MatchCounts:
    """One-to-one matches of two detection sets of one tile, polygon against polygon
    (each drawn alone, so overlapping objects do not hide each other): true positives
    are reference objects a candidate covers at IoU >= ``iou``, false negatives the
    reference objects left unmatched, false positives the candidate's extra objects."""
    from skimage.draw import polygon as draw_polygon

    def pixels(found: Detections) -> list[np.ndarray]:
        out = []
        for vertices in found.polygons():
            rows, cols = draw_polygon(vertices[:, 0], vertices[:, 1], shape)
            out.append(np.unique(rows.astype(np.int64) * shape[1] + cols))
        return out

    ref, cand = pixels(reference), pixels(candidate)
    pairs = []
    for i, a in enumerate(ref):
        for j, b in enumerate(cand):
            if not len(a) or not len(b) or a[-1] < b[0] or b[-1] < a[0]:
                continue
            shared = len(np.intersect1d(a, b, assume_unique=True))
            score = shared / (len(a) + len(b) - shared)
            if score >= iou:
                pairs.append((score, i, j))
    used_r, used_c, matched = set(), set(), 0
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_r and j not in used_c:
            used_r.add(i)
            used_c.add(j)
            matched += 1
    return MatchCounts(matched, len(cand) - matched, len(ref) - matched)
