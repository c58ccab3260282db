"""How well a head's probabilities and calls match labels: the one metrics module of
``cytoedge train`` (out-of-fold predictions) and ``cytoedge validate`` (scored cases).

numpy only, so the appliance side (``cytoedge validate``, no torch) and the export
side (training, which imports it) compute every figure the same way. Conventions:
labels are 1 / 0 with NaN for unknown (dropped); a score at or above a threshold
is called positive; intervals are 95 % unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CALIBRATION_BINS = 10


def _known(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels, np.float64).reshape(-1)
    keep = ~np.isnan(labels)
    return scores[keep], labels[keep].astype(bool)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney: ties count half); NaN with one class."""
    scores, labels = _known(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


@dataclass(frozen=True)
class RocCurve:
    """The ROC curve's corners, from (0, 0) to (1, 1): one per distinct score."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # calling positive at >= threshold gives (fpr, tpr); inf first


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> RocCurve:
    scores, labels = _known(scores, labels)
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    positives, negatives = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    tpr = np.array([(scores[labels] >= t).sum() / positives for t in thresholds])
    fpr = np.array([(scores[~labels] >= t).sum() / negatives for t in thresholds])
    return RocCurve(fpr, tpr, thresholds)


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) case indices drawn with replacement; the same for the same seed."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def bootstrap_auc_interval(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the AUC over cases resampled with replacement.

    Resamples holding one class only have no AUC and are left out; (NaN, NaN) when
    the labels hold one class. Percentiles interpolate linearly (numpy's default).
    """
    scores, labels = _known(scores, labels)
    if labels.all() or not labels.any():
        return float("nan"), float("nan")
    values = [
        auc(scores[rows], labels[rows])
        for rows in bootstrap_indices(len(scores), resamples, seed)
        if 0 < labels[rows].sum() < len(rows)
    ]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Thresholds between consecutive distinct scores, and one below the lowest."""
    values = np.unique(scores)
    return np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2])


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the lowest such, between
    two scores); 0.5 when the labels hold one class."""
    scores, labels = _known(scores, labels)
    if labels.all() or not labels.any():
        return 0.5
    best, best_j = 0.5, -np.inf
    for threshold in _candidates(scores):
        called = scores >= threshold
        j = called[labels].mean() - called[~labels].mean()
        if j > best_j:
            best, best_j = float(threshold), j
    return float(np.clip(best, 0.0, 1.0))


def threshold_for_sensitivity(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The highest threshold (between two scores) whose sensitivity is at least ``target``."""
    scores, labels = _known(scores, labels)
    if not labels.any():
        return 0.5
    reaching = [t for t in _candidates(scores) if (scores[labels] >= t).mean() >= target]
    return float(np.clip(max(reaching), 0.0, 1.0))


@dataclass(frozen=True)
class CallCounts:
    """Determinate calls against the truth, and the calls that were not made."""

    tp: int
    fp: int
    tn: int
    fn: int
    indeterminate: int

    @property
    def sensitivity(self) -> tuple[int, int]:
        return self.tp, self.tp + self.fn

    @property
    def specificity(self) -> tuple[int, int]:
        return self.tn, self.tn + self.fp

    @property
    def ppv(self) -> tuple[int, int]:
        return self.tp, self.tp + self.fp

    @property
    def npv(self) -> tuple[int, int]:
        return self.tn, self.tn + self.fn


def count_calls(calls: Sequence[str], truth: Sequence[bool]) -> CallCounts:
    """Count positive / negative calls against the truth; other calls are indeterminate."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "indeterminate": 0}
    for called, actual in zip(calls, truth, strict=True):
        if called == "positive":
            counts["tp" if actual else "fp"] += 1
        elif called == "negative":
            counts["fn" if actual else "tn"] += 1
        else:
            counts["indeterminate"] += 1
    return CallCounts(**counts)


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram: per bin of predicted probability, its mean and what happened."""

    edges: np.ndarray  # (bins + 1,)
    predicted: np.ndarray  # (bins,) mean probability in the bin (NaN when empty)
    observed: np.ndarray  # (bins,) fraction of outcomes that were true (NaN when empty)
    counts: np.ndarray  # (bins,)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean of |observed - predicted|."""
        filled = self.counts > 0
        if not filled.any():
            return float("nan")
        gaps = np.abs(self.observed[filled] - self.predicted[filled])
        return float((gaps * self.counts[filled]).sum() / self.counts.sum())


def reliability(
    probabilities: np.ndarray, outcomes: np.ndarray, bins: int = CALIBRATION_BINS
) -> Reliability:
    """Equal-width bins over [0, 1] (1.0 falls in the last); NaN outcomes are dropped.

    For a task: the probability of positive and the label. For a multi-class head:
    the top class's probability and whether it was right (top-label calibration).
    """
    probabilities, outcomes = _known(probabilities, outcomes)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(which, probabilities, bins) / counts
        observed = np.bincount(which, outcomes.astype(np.float64), bins) / counts
    return Reliability(edges, predicted, observed, counts)


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    matrix = np.zeros((classes, classes), np.int64)
    for t, p in zip(truth, predicted, strict=True):
        matrix[t, p] += 1
    return matrix


def per_class_recall(matrix: np.ndarray) -> np.ndarray:
    """Each row's diagonal share; NaN for a class no case has."""
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / totals, np.nan)


def macro_recall(matrix: np.ndarray) -> float:
    """The mean recall over the classes present."""
    recalls = per_class_recall(matrix)
    return float(np.nanmean(recalls)) if np.isfinite(recalls).any() else float("nan")


def top_k_accuracy(probabilities: np.ndarray, truth: Sequence[int], k: int) -> float:
    """Share of cases whose true class is among the k most probable."""
    probabilities = np.asarray(probabilities, np.float64)
    if len(probabilities) == 0:
        return float("nan")
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean([t in row for t, row in zip(truth, ranked, strict=True)]))
