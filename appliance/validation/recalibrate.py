"""New thresholds chosen on a site's own cases, written as a new bundle version.

Per task: Youden's index on the cases' probabilities (the calibrated ones the
runtime calls with), or the highest threshold that keeps a sensitivity the site
asks for. Only thresholds change; the networks, calibration and indeterminate
band stay, and the bundle recalibrated from is left as it was.

For a cell head, on a site's labelled cells: a new operating point, the lowest
confidence at which the cells at or above it reach the head's target accuracy
(``cell_measures.operating_point``, as training chose it out of fold).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from appliance.site.derived_versions import derived_from, write_bundle_version
from appliance.validation import metrics
from appliance.validation.cell_measures import OperatingPoint, operating_point
from appliance.validation.measures import CellReport, ValidationReport
from runtime.bundle_format import Bundle, HeadSpec
from runtime.head_kinds.cell_classifier import CONFIDENCE, CellClassifierParams

THRESHOLD_LIMITS = (1e-3, 1 - 1e-3)  # bundle thresholds lie strictly inside (0, 1)


class RecalibrationError(ValueError):
    """A recalibration that cannot be made; one line."""


def parse_targets(texts: list[str]) -> dict[str, float]:
    """``TASK=SENSITIVITY`` (or ``HEAD:TASK=...``) pairs, e.g. ``del(17p)=0.95``."""
    targets = {}
    for text in texts:
        task, _, value = text.rpartition("=")
        try:
            sensitivity = float(value)
        except ValueError:
            sensitivity = -1.0
        if not task or not 0 < sensitivity <= 1:
            raise RecalibrationError(
                f"--target-sensitivity {text!r}: give TASK=SENSITIVITY, e.g. del(17p)=0.95"
            )
        targets[task.strip()] = sensitivity
    return targets


def new_thresholds(
    bundle: Bundle, report: ValidationReport, targets: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """{head: {task: threshold}} for every task the report measured."""
    known = {t.task for t in report.tasks} | {f"{t.head}:{t.task}" for t in report.tasks}
    stray = sorted(set(targets) - known)
    if stray:
        raise RecalibrationError(
            f"--target-sensitivity names {stray[0]!r}, which these cases do not measure "
            f"(they measure {', '.join(sorted({t.task for t in report.tasks})) or 'nothing'})"
        )
    chosen: dict[str, dict[str, float]] = {}
    for task in report.tasks:
        scores, truth = np.array(task.scores), np.array(task.truth, bool)
        if truth.all() or not truth.any():
            raise RecalibrationError(
                f"{task.head}: {task.label}: these cases have only "
                f"{'positives' if truth.any() else 'negatives'}; a threshold needs both"
            )
        target = targets.get(f"{task.head}:{task.task}", targets.get(task.task))
        value = (
            metrics.youden_threshold(scores, truth)
            if target is None
            else metrics.threshold_for_sensitivity(scores, truth, target)
        )
        chosen.setdefault(task.head, {})[task.task] = float(np.clip(value, *THRESHOLD_LIMITS))
    return chosen


def write_recalibrated(
    bundle: Bundle,
    report: ValidationReport,
    thresholds: Mapping[str, Mapping[str, float]],
    targets: Mapping[str, float],
    destination: Path,
    version: str,
) -> Bundle:
    """``bundle`` with ``thresholds`` as ``version`` at ``destination``."""
    heads = [
        dataclasses.replace(spec, thresholds={**spec.thresholds, **thresholds.get(spec.name, {})})
        for spec in bundle.heads
    ]
    provenance = {
        **bundle.provenance,
        "recalibration": {
            "derived_from": derived_from(bundle),
            "cases_table": report.cases_table,
            "cases_table_sha256": report.cases_table_sha256,
            "cases": report.cases,
            "method": {
                f"{t.head}:{t.task}": _method(
                    targets.get(f"{t.head}:{t.task}", targets.get(t.task))
                )
                for t in report.tasks
            },
            "thresholds_before": {spec.name: dict(spec.thresholds) for spec in bundle.heads},
            "thresholds": {head: dict(values) for head, values in thresholds.items()},
        },
    }
    return write_bundle_version(
        bundle,
        destination,
        version=version,
        heads=heads,
        head_files={},
        provenance=provenance,
    )


def _method(target: float | None) -> str:
    return "Youden's index" if target is None else f"highest threshold with sensitivity >= {target}"


def new_operating_point(
    spec: HeadSpec, truth: Sequence[str], calibrated: np.ndarray
) -> OperatingPoint:
    """The cell head's operating point for its target accuracy on these labelled cells
    (``calibrated``: their probabilities in its class order)."""
    params: CellClassifierParams = spec.params
    actual = np.array([spec.outputs.index(label) for label in truth], np.int64)
    confidence = calibrated.max(axis=1)
    correct = calibrated.argmax(axis=1) == actual
    point = operating_point(confidence, correct, params.target_accuracy)
    if not point.reached:
        raise RecalibrationError(
            f"cell head {spec.name}: no confidence reaches the target accuracy "
            f"{params.target_accuracy} on these cells (the surest are right "
            f"{point.accuracy:.3f} of the time); the operating point stays "
            f"{spec.thresholds[CONFIDENCE]:.3f}"
        )
    # A bundle's thresholds lie inside (0, 1): a clipped point calls the cells it now covers.
    value = float(np.clip(point.confidence, *THRESHOLD_LIMITS))
    sure = confidence >= value
    accuracy = float(correct[sure].mean())
    return OperatingPoint(value, float(sure.mean()), accuracy, accuracy >= params.target_accuracy)


def write_recalibrated_cell_head(
    bundle: Bundle, cells: CellReport, point: OperatingPoint, destination: Path, version: str
) -> Bundle:
    """``bundle`` with its cell head at operating point ``point`` (chosen on the labelled
    cells ``cells`` measured) as ``version`` at ``destination``."""
    spec = bundle.cell_head
    if spec is None:
        raise RecalibrationError(f"bundle {bundle.name} {bundle.version} has no cell head")
    head = dataclasses.replace(
        spec,
        thresholds={CONFIDENCE: point.confidence},
        extra={**spec.extra, "coverage": point.coverage},
    )
    provenance = {
        **bundle.provenance,
        "recalibration": {
            "derived_from": derived_from(bundle),
            "labelled_cells": cells.source,
            "cells": cells.figures.cells,
            "method": "the lowest confidence whose cells reach the target accuracy "
            f"{cells.figures.target_accuracy} on these cells",
            "operating_point_before": spec.thresholds[CONFIDENCE],
            "operating_point": point.confidence,
            "coverage": point.coverage,
            "accuracy": point.accuracy,
        },
    }
    return write_bundle_version(
        bundle,
        destination,
        version=version,
        heads=bundle.heads,
        head_files={},
        provenance=provenance,
        cell_head=head,
    )
