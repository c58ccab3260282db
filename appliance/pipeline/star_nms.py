"""Star-convex non-maximum suppression over the candidates that can still matter.

A 928 px tile gives StarDist 5,000-7,000 grid cells above the probability threshold
for some 80 objects kept (a real photo of packed red cells up to 23,000 in a
384 x 512 px field). stardist's NMS builds a polygon for every candidate and
intersects each kept object with every candidate around it, and that is most of its
cost; almost every candidate is suppressed by the object of its own cell.

``suppress`` runs stardist's NMS (``stardist.nms``, unchanged) on a small set, the
local maxima of the probability grid first, then judges each candidate left out
against the nearest objects that set kept. A candidate stays out only when a kept
object of higher probability clearly suppresses it: discs of the two polygons'
areas at their centres overlap by more than ``nms_thresh + MARGIN`` of the smaller
(stardist's measure: intersection over the smaller area), and each centre lies within
``INNER`` of the other polygon's ray towards it. The rest join the set and the NMS
runs again, until every candidate left out is judged suppressed; where most are not
(``FALLBACK``), stardist's NMS runs on every candidate at once, as it did before.

Greedy NMS never lets a suppressed candidate suppress another, so leaving out
candidates that a kept object suppresses changes nothing; the judgement is an
estimate, not a proof, so the result is held to ``suppress_all`` (stardist's NMS on
every candidate) by the detection-parity rule of ``runtime.parity`` on synthetic and
real tiles (tests/test_star_nms.py; ``cytoedge bench segmentation --variants``
measures both; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np

# Chosen on the real photos of ../shared/data and synthetic tiles (docs/BENCHMARKS.md):
# MARGIN 0.3 without the INNER condition lost 1 of 1,732 detections on Chula RBC-12.
MARGIN = 0.2  # a candidate stays out only with an estimated overlap this far past the threshold
INNER = 0.7  # share of a polygon's ray within which the other centre must lie
NEIGHBOURS = 2  # kept objects (nearest centres first) a candidate is judged against
FALLBACK = 0.3  # more than this share of those left out not judged: NMS on every candidate


def suppress_all(
    points: np.ndarray, probs: np.ndarray, dists: np.ndarray, nms_thresh: float
) -> np.ndarray:
    """Indices of the objects stardist's NMS keeps of all candidates, best first."""
    return _stardist_nms(points, probs, dists, nms_thresh, np.arange(len(probs)))


def suppress(
    points: np.ndarray,
    probs: np.ndarray,
    dists: np.ndarray,
    nms_thresh: float,
    seeds: np.ndarray,
) -> np.ndarray:
    """Indices of the objects kept, best first (module docstring), starting from the
    candidates ``seeds`` marks (bool); ``points`` (N, 2), ``dists`` (N, n_rays) in pixels."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, np.float64)
    radius = np.sqrt(polygon_area(dists) / np.pi)
    in_set = np.asarray(seeds, bool).copy()
    while True:
        kept = _stardist_nms(points, probs, dists, nms_thresh, np.flatnonzero(in_set))
        out = np.flatnonzero(~in_set)
        if not len(out):
            return kept
        if not len(kept):  # no seeds: nothing to judge against
            return suppress_all(points, probs, dists, nms_thresh)
        neighbours = min(NEIGHBOURS, len(kept))
        distance, nearest = cKDTree(points[kept]).query(points[out], k=neighbours)
        by = kept[nearest.reshape(len(out), neighbours)]
        r_out, r_by = radius[out, None], radius[by]
        shared = lens_area(r_out, r_by, distance.reshape(len(out), neighbours))
        overlap = shared / (np.pi * np.minimum(r_out, r_by) ** 2)
        inner = _inner(points, dists, out, by)
        sure = ((overlap > nms_thresh + MARGIN) & (probs[by] > probs[out, None]) & inner).any(1)
        if sure.all():
            return kept
        if (~sure).sum() > FALLBACK * len(out):
            return suppress_all(points, probs, dists, nms_thresh)
        in_set[out[~sure]] = True


def _inner(points: np.ndarray, dists: np.ndarray, out: np.ndarray, by: np.ndarray) -> np.ndarray:
    """(len(out), K) bool: each centre lies well inside the other's polygon, within
    ``INNER`` of that polygon's ray towards it."""
    n_rays = dists.shape[1]
    offset = points[out, None, :] - points[by]  # from the kept object to the candidate
    distance = np.hypot(offset[..., 0], offset[..., 1])
    ray = np.rint(np.arctan2(offset[..., 0], offset[..., 1]) / (2 * np.pi / n_rays)).astype(int)
    towards_out = dists[by, ray % n_rays]
    towards_by = dists[out[:, None], (ray + n_rays // 2) % n_rays]
    return (distance <= INNER * towards_out) & (distance <= INNER * towards_by)


def polygon_area(dists: np.ndarray) -> np.ndarray:
    """(N,) area of each star-convex polygon of (N, n_rays) rays at equal angles."""
    a, b = dists.astype(np.float64), np.roll(dists, -1, axis=1).astype(np.float64)
    return 0.5 * np.sin(2 * np.pi / dists.shape[1]) * (a * b).sum(axis=1)


def lens_area(r1: np.ndarray, r2: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Area shared by discs of radii ``r1`` and ``r2`` whose centres are ``d`` apart."""
    r1, r2, d = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (r1, r2, d)))
    small = np.minimum(r1, r2)
    out = np.where(d <= np.abs(r1 - r2), np.pi * small * small, 0.0)
    partial = (d > np.abs(r1 - r2)) & (d < r1 + r2)
    a, b, s = r1[partial], r2[partial], d[partial]
    cos1 = np.clip((s * s + a * a - b * b) / (2 * s * a), -1.0, 1.0)
    cos2 = np.clip((s * s + b * b - a * a) / (2 * s * b), -1.0, 1.0)
    kite = (-s + a + b) * (s + a - b) * (s - a + b) * (s + a + b)
    out[partial] = (
        a * a * np.arccos(cos1) + b * b * np.arccos(cos2) - 0.5 * np.sqrt(np.maximum(kite, 0.0))
    )
    return out


def _stardist_nms(
    points: np.ndarray, probs: np.ndarray, dists: np.ndarray, nms_thresh: float, subset: np.ndarray
) -> np.ndarray:
    from stardist.nms import non_maximum_suppression_sparse

    if not len(subset):
        return subset
    *_, order = non_maximum_suppression_sparse(
        dists[subset], probs[subset], points[subset], nms_thresh=nms_thresh
    )
    return subset[order]
