"""New thresholds chosen on a site's own cases, written as a new bundle version.

Per task: Youden's index on the cases' probabilities (the calibrated ones the
runtime calls with), or the highest threshold that keeps a sensitivity the site
asks for. Only thresholds change; the networks, calibration and indeterminate
band stay, and the bundle recalibrated from is left as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from appliance.site.derived_versions import derived_from, write_bundle_version
from appliance.validation import metrics
from appliance.validation.measures import ValidationReport
from runtime.bundle_format import Bundle

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
