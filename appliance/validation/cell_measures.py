"""How well a cell head's classes match labelled cells: the figures of ``cytoedge train``
(out of fold) and ``cytoedge validate`` (a bundle on a site's labelled cells) alike.

Per class precision, recall and F1 (and their support); weighted and macro F1; the
confusion matrix; the dangerous confusions the taxonomy names; and selective
prediction (METHOD.md C): as the confidence a call needs rises, fewer cells are
called (coverage) and those called are more often right (accuracy). The operating
point is the lowest confidence at which the accuracy of the cells at or above it
reaches the target (default 0.99); the cells below it are *unsure* and go to a
person. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.taxonomy import Taxonomy

CURVE_POINTS = 50  # accuracy-coverage pairs kept for the report's curve


@dataclass(frozen=True)
class CellClassFigures:
    name: str
    label: str
    support: int  # labelled cells of this class
    precision: float  # NaN when no cell was called this class
    recall: float  # NaN without support
    f1: float


@dataclass(frozen=True)
class CoveragePoint:
    """The cells whose confidence is at least ``confidence``: their share and accuracy."""

    confidence: float
    coverage: float
    accuracy: float


@dataclass(frozen=True)
class OperatingPoint:
    confidence: float  # a call needs at least this calibrated confidence
    coverage: float  # the share of cells called at it
    accuracy: float  # the accuracy of those cells
    reached: bool  # False: no confidence reaches the target; the surest cells alone are called


@dataclass(frozen=True)
class CriticalPair:
    """Labelled cells of class ``true`` called ``called``, a confusion the taxonomy names
    dangerous; ``sure``: of those, the ones at or above the operating point."""

    true: str
    called: str
    cells: int
    sure: int


@dataclass(frozen=True)
class CellFigures:
    taxonomy: str
    cells: int
    classes: tuple[CellClassFigures, ...]  # in the taxonomy's order
    accuracy: float  # every cell called by its most probable class
    weighted_f1: float  # weighted by support
    macro_f1: float  # over the classes with support
    confusion: tuple[tuple[int, ...], ...]  # rows: truth, columns: called, taxonomy order
    critical_errors: int  # cells the taxonomy's critical confusions describe
    critical_errors_sure: int  # of those, the ones at or above the operating point
    critical_pairs: tuple[CriticalPair, ...]  # the same errors by (truth, call), most first
    curve: tuple[CoveragePoint, ...]  # confidence falling, coverage rising
    operating_point: OperatingPoint
    target_accuracy: float


def operating_point(confidence: np.ndarray, correct: np.ndarray, target: float) -> OperatingPoint:
    """The lowest confidence whose cells at or above it are right at least ``target`` of
    the time (the most cells a person need not look at); when no confidence reaches it,
    the highest one, so that only the surest cells are called."""
    if len(confidence) == 0:
        return OperatingPoint(1.0, 0.0, float("nan"), False)
    order = np.argsort(-confidence, kind="stable")
    ranked, right = confidence[order], correct[order].astype(np.float64)
    accuracy = np.cumsum(right) / np.arange(1, len(right) + 1)
    # Only the last of a run of equal confidences is a threshold a cell can be cut at.
    ends = np.append(ranked[1:] != ranked[:-1], True)
    reaching = np.flatnonzero(ends & (accuracy >= target))
    if len(reaching):
        last = int(reaching[-1])
        reached = True
    else:
        last = int(np.flatnonzero(ends)[0])
        reached = False
    return OperatingPoint(
        confidence=float(ranked[last]),
        coverage=(last + 1) / len(ranked),
        accuracy=float(accuracy[last]),
        reached=reached,
    )


def coverage_curve(
    confidence: np.ndarray, correct: np.ndarray, points: int = CURVE_POINTS
) -> tuple[CoveragePoint, ...]:
    """Accuracy against coverage at ``points`` confidences spread over the cells."""
    if len(confidence) == 0:
        return ()
    order = np.argsort(-confidence, kind="stable")
    ranked, right = confidence[order], correct[order].astype(np.float64)
    accuracy = np.cumsum(right) / np.arange(1, len(right) + 1)
    picks = np.unique(np.linspace(0, len(ranked) - 1, min(points, len(ranked))).astype(int))
    return tuple(
        CoveragePoint(float(ranked[i]), (i + 1) / len(ranked), float(accuracy[i])) for i in picks
    )


def cell_figures(
    taxonomy: Taxonomy,
    truth: Sequence[str],
    probabilities: np.ndarray,
    *,
    target_accuracy: float = 0.99,
    confidence_needed: float | None = None,
) -> CellFigures:
    """The figures of calibrated ``probabilities`` (N, C, the taxonomy's order) against
    the labelled classes ``truth``. ``confidence_needed``: the bundle's operating point
    (validation); None chooses it for ``target_accuracy`` (training)."""
    names = taxonomy.names
    unknown = sorted(set(truth) - set(names))
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of taxonomy {taxonomy.name}")
    if probabilities.shape != (len(truth), len(names)):
        raise ValueError(
            f"probabilities {probabilities.shape} for {len(truth)} cells of {len(names)} classes"
        )
    actual = np.array([names.index(label) for label in truth], np.int64)
    called = probabilities.argmax(axis=1) if len(actual) else np.zeros(0, np.int64)
    confidence = probabilities.max(axis=1) if len(actual) else np.zeros(0)
    correct = called == actual
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (actual, called), 1)
    rows = []
    for index, cell_class in enumerate(taxonomy.classes):
        support = int(confusion[index].sum())
        predicted = int(confusion[:, index].sum())
        hits = int(confusion[index, index])
        precision = hits / predicted if predicted else float("nan")
        recall = hits / support if support else float("nan")
        f1 = (
            2 * precision * recall / (precision + recall)
            if predicted and support and precision + recall > 0
            else 0.0
        )
        rows.append(
            CellClassFigures(cell_class.name, cell_class.label, support, precision, recall, f1)
        )
    supported = [r for r in rows if r.support]
    total = sum(r.support for r in supported)
    if confidence_needed is None:
        point = operating_point(confidence, correct, target_accuracy)
    else:
        sure = confidence >= confidence_needed
        point = OperatingPoint(
            confidence=float(confidence_needed),
            coverage=float(sure.mean()) if len(sure) else 0.0,
            accuracy=float(correct[sure].mean()) if sure.any() else float("nan"),
            reached=bool(sure.any()) and float(correct[sure].mean()) >= target_accuracy,
        )
    sure = confidence >= point.confidence
    critical = np.array(
        [taxonomy.is_critical(names[a], names[c]) for a, c in zip(actual, called, strict=True)],
        bool,
    )
    return CellFigures(
        taxonomy=taxonomy.name,
        cells=len(actual),
        classes=tuple(rows),
        accuracy=float(correct.mean()) if len(actual) else float("nan"),
        weighted_f1=sum(r.f1 * r.support for r in supported) / total if total else float("nan"),
        macro_f1=float(np.mean([r.f1 for r in supported])) if supported else float("nan"),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        critical_errors=int(critical.sum()),
        critical_errors_sure=int((critical & sure).sum()),
        critical_pairs=_critical_pairs(names, actual[critical], called[critical], sure[critical]),
        curve=coverage_curve(confidence, correct),
        operating_point=point,
        target_accuracy=target_accuracy,
    )


def _critical_pairs(
    names: tuple[str, ...], actual: np.ndarray, called: np.ndarray, sure: np.ndarray
) -> tuple[CriticalPair, ...]:
    pairs: dict[tuple[int, int], list[int]] = {}
    for a, c, s in zip(actual.tolist(), called.tolist(), sure.tolist(), strict=True):
        counts = pairs.setdefault((a, c), [0, 0])
        counts[0] += 1
        counts[1] += int(s)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1][0], item[0]))
    return tuple(CriticalPair(names[a], names[c], n, s) for (a, c), (n, s) in ranked)
