"""A validation report's figures: every head of a bundle against the labels of a cohort.

``build_report`` takes each case's outcome as result.json holds it (status, and per
head its probabilities, calls and findings) and its labels; each head's kind says
what the labels mean for its outputs (``HeadKind.truth``), so nothing here knows a
kind by name. ``cytoedge validate`` gives it scored cases, ``cytoedge train`` its
out-of-fold predictions: one set of figures, one layout. A report may also hold a cell
head's figures on labelled cells (``cell_report``), beside the cases or alone.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from appliance.pipeline.differential import wilson_interval
from appliance.results import BundleRecord, HeadRecord, PredictionRecord
from appliance.validation import metrics
from appliance.validation.cases_table import CasesTable
from appliance.validation.cell_measures import CellFigures
from runtime.bundle_format import HeadSpec
from runtime.head_kinds import Labels
from runtime.head_kinds.cell_classifier import CellClassifierParams
from runtime.taxonomy import CriticalConfusion

ReportKind = Literal["validation", "out-of-fold"]


@dataclass(frozen=True)
class ValidationCase:
    """One labelled case as the bundle scored it (or could not)."""

    case_id: str
    labels: Labels
    status: str  # scored | abstained | rejected
    reason: str | None = None  # why abstained or rejected
    heads: dict[str, HeadRecord] = field(default_factory=dict)
    rejected_scans: tuple[str, ...] = ()  # "<scan>: <reason>" for each scan the case lost


@dataclass(frozen=True)
class Proportion:
    """successes / total with its Wilson 95 % interval (None where total is 0)."""

    successes: int
    total: int
    value: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class TaskFigures:
    """One binary task of one head at the bundle's threshold."""

    head: str
    task: str
    label: str
    threshold: float
    band: float
    labelled: int  # cases whose labels decide this task
    positives: int
    scored: int  # of those, with a probability
    not_scored: int  # abstained, rejected, or the head did not run: never dropped silently
    indeterminate: int
    auc: float | None
    auc_low: float | None
    auc_high: float | None
    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion
    npv: Proportion
    ece: float | None
    roc: tuple[tuple[float, float], ...]  # (fpr, tpr) corners
    reliability: tuple[tuple[float, float, int], ...]  # (mean predicted, observed, count)
    scores: tuple[float, ...]  # the scored cases' probabilities, for thresholds chosen later
    truth: tuple[bool, ...]


@dataclass(frozen=True)
class ClassFigures:
    """A head whose outputs are exclusive classes: its top class against the truth."""

    head: str
    classes: tuple[str, ...]
    labelled: int
    scored: int
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted
    recall: dict[str, float | None]
    macro_recall: float | None
    top1: float | None
    top2: float | None
    ece: float | None  # top-label calibration
    reliability: tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class ValueFigures:
    """A head's regression finding (hemoglobin) against the labelled value."""

    head: str
    key: str
    label: str
    labelled: int
    scored: int
    mean_absolute_error: float | None


@dataclass(frozen=True)
class CaseLine:
    case_id: str
    status: str
    reason: str | None
    rejected_scans: tuple[str, ...] = ()


@dataclass(frozen=True)
class CellReport:
    """A cell head against labelled cells: the figures (``cell_measures.cell_figures``)
    and what a reader needs beside them."""

    head: str
    taxonomy_title: str
    source: str  # the labelled cells' folder or file name
    temperature: float | None  # the calibration the confidences went through
    critical: tuple[CriticalConfusion, ...]  # the taxonomy's dangerous confusions, with why
    figures: CellFigures


@dataclass(frozen=True)
class ValidationReport:
    kind: ReportKind
    created: str
    bundle_name: str
    bundle_version: str
    bundle_sha256: str
    intended_use: str
    cases_table: str | None  # the table's file name, a copy beside the report; None: cells only
    cases_table_sha256: str | None
    cases: int
    bootstrap_resamples: int
    seed: int
    tasks: tuple[TaskFigures, ...]
    classes: tuple[ClassFigures, ...]
    values: tuple[ValueFigures, ...]
    not_scored: tuple[CaseLine, ...]  # every case that got no call, with why
    lost_scans: tuple[CaseLine, ...]  # scored cases that lost a scan the reader rejected
    cells: CellReport | None = None  # the cell head on labelled cells
    # Out of fold with recipes compared (``train --compare-recipes``): each head that
    # predicts the markers, the written one first, by the recipe that made it
    recipes: dict[str, str] = field(default_factory=dict)


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined figure is None."""
    return None if value is None or not math.isfinite(value) else float(value)


def proportion(successes: int, total: int) -> Proportion:
    low, high = wilson_interval(successes, total)
    value = successes / total if total else float("nan")
    return Proportion(successes, total, _number(value), _number(low), _number(high))


def _bins(reliability: metrics.Reliability) -> tuple[tuple[float, float, int], ...]:
    return tuple(
        (float(p), float(o), int(n))
        for p, o, n in zip(
            reliability.predicted, reliability.observed, reliability.counts, strict=True
        )
        if n > 0
    )


def _prediction(case: ValidationCase, head: str, task: str) -> PredictionRecord | None:
    record = case.heads.get(head)
    if record is None:
        return None
    return next((p for p in record.predictions if p.task == task), None)


def task_figures(
    spec: HeadSpec, task: str, cases: Sequence[ValidationCase], resamples: int, seed: int
) -> TaskFigures | None:
    """The task's figures over the cases whose labels decide it; None when none do."""
    kind = spec.head_kind
    labelled = [(c, kind.truth(spec, c.labels).tasks.get(task)) for c in cases]
    labelled = [(c, t) for c, t in labelled if t is not None]
    if not labelled:
        return None
    scored = [(p, t) for c, t in labelled if (p := _prediction(c, spec.name, task)) is not None]
    scores = np.array([p.probability for p, _ in scored], np.float64)
    truth = np.array([t for _, t in scored], bool)
    counts = metrics.count_calls([p.call for p, _ in scored], truth.tolist())
    low, high = metrics.bootstrap_auc_interval(scores, truth, resamples=resamples, seed=seed)
    curve = metrics.roc_curve(scores, truth)
    calibration = metrics.reliability(scores, truth)
    return TaskFigures(
        head=spec.name,
        task=task,
        label=spec.label(task),
        threshold=float(spec.thresholds[task]),
        band=float(spec.indeterminate_band),
        labelled=len(labelled),
        positives=sum(bool(t) for _, t in labelled),
        scored=len(scored),
        not_scored=len(labelled) - len(scored),
        indeterminate=counts.indeterminate,
        auc=_number(metrics.auc(scores, truth)),
        auc_low=_number(low),
        auc_high=_number(high),
        sensitivity=proportion(*counts.sensitivity),
        specificity=proportion(*counts.specificity),
        ppv=proportion(*counts.ppv),
        npv=proportion(*counts.npv),
        ece=_number(calibration.ece) if len(scores) else None,
        roc=tuple((float(f), float(t)) for f, t in zip(curve.fpr, curve.tpr, strict=True)),
        reliability=_bins(calibration),
        scores=tuple(float(s) for s in scores),
        truth=tuple(bool(t) for t in truth),
    )


def class_figures(spec: HeadSpec, cases: Sequence[ValidationCase]) -> ClassFigures | None:
    """Confusion, recall per class, top-1 / top-2 over the cases with a class label."""
    kind = spec.head_kind
    classes = spec.outputs
    labelled = [(c, kind.truth(spec, c.labels).label) for c in cases]
    labelled = [(c, label) for c, label in labelled if label is not None]
    if not labelled:
        return None
    rows = [
        ([c.heads[spec.name].probabilities[o] for o in classes], classes.index(label))
        for c, label in labelled
        if spec.name in c.heads
    ]
    probabilities = np.array([p for p, _ in rows], np.float64).reshape(-1, len(classes))
    truth = [t for _, t in rows]
    predicted = probabilities.argmax(axis=1).tolist() if rows else []
    matrix = metrics.confusion_matrix(truth, predicted, len(classes))
    recall = metrics.per_class_recall(matrix)
    confidence = probabilities.max(axis=1) if rows else np.zeros(0)
    correct = np.array([p == t for p, t in zip(predicted, truth, strict=True)], np.float64)
    calibration = metrics.reliability(confidence, correct)
    return ClassFigures(
        head=spec.name,
        classes=tuple(spec.label(c) for c in classes),
        labelled=len(labelled),
        scored=len(rows),
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
        recall={spec.label(c): _number(r) for c, r in zip(classes, recall, strict=True)},
        macro_recall=_number(metrics.macro_recall(matrix)),
        top1=_number(metrics.top_k_accuracy(probabilities, truth, 1)),
        top2=_number(metrics.top_k_accuracy(probabilities, truth, 2)),
        ece=_number(calibration.ece) if rows else None,
        reliability=_bins(calibration),
    )


def value_figures(spec: HeadSpec, cases: Sequence[ValidationCase]) -> list[ValueFigures]:
    """Each labelled value against the head's finding of the same key."""
    kind = spec.head_kind
    found: dict[str, list[tuple[float, float | None]]] = {}
    labels: dict[str, str] = {}
    for case in cases:
        for key, truth in kind.truth(spec, case.labels).values.items():
            record = case.heads.get(spec.name)
            finding = next((f for f in record.findings if f.key == key), None) if record else None
            if finding is not None:
                labels[key] = finding.label
            found.setdefault(key, []).append(
                (truth, finding.value if finding is not None else None)
            )
    figures = []
    for key, pairs in found.items():
        errors = [abs(t - v) for t, v in pairs if v is not None]
        figures.append(
            ValueFigures(
                head=spec.name,
                key=key,
                label=labels.get(key, key),
                labelled=len(pairs),
                scored=len(errors),
                mean_absolute_error=_number(float(np.mean(errors))) if errors else None,
            )
        )
    return figures


def cell_report(spec: HeadSpec, figures: CellFigures, source: str) -> CellReport:
    """The report's part for cell head ``spec``'s ``figures`` on the labelled cells of
    ``source`` (a folder or file name: what lasts of where the cells came from)."""
    params: CellClassifierParams = spec.params
    return CellReport(
        head=spec.name,
        taxonomy_title=params.taxonomy.title,
        source=source,
        temperature=spec.calibration.get("temperature"),
        critical=params.taxonomy.critical,
        figures=figures,
    )


def build_report(
    heads: Sequence[HeadSpec],
    bundle: BundleRecord,
    cases: Sequence[ValidationCase],
    *,
    kind: ReportKind,
    table: CasesTable | None,
    resamples: int = metrics.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    cells: CellReport | None = None,
) -> ValidationReport:
    """Every figure of every head in ``heads`` (those of ``bundle``) over ``cases``, the
    cases of ``table``, and the cell head's figures ``cells``; a report of labelled
    cells alone has no table and no cases."""
    tasks: list[TaskFigures] = []
    classes: list[ClassFigures] = []
    values: list[ValueFigures] = []
    for spec in heads:
        for task in spec.thresholds:
            figures = task_figures(spec, task, cases, resamples, seed)
            if figures is not None:
                tasks.append(figures)
        by_class = class_figures(spec, cases)
        if by_class is not None:
            classes.append(by_class)
        values.extend(value_figures(spec, cases))
    return ValidationReport(
        kind=kind,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        bundle_sha256=bundle.sha256,
        intended_use=bundle.intended_use,
        cases_table=table.name if table is not None else None,
        cases_table_sha256=table.sha256 if table is not None else None,
        cases=len(cases),
        bootstrap_resamples=resamples,
        seed=seed,
        tasks=tuple(tasks),
        classes=tuple(classes),
        values=tuple(values),
        not_scored=tuple(
            CaseLine(c.case_id, c.status, c.reason, c.rejected_scans)
            for c in cases
            if c.status != "scored"
        ),
        lost_scans=tuple(
            CaseLine(c.case_id, c.status, None, c.rejected_scans)
            for c in cases
            if c.status == "scored" and c.rejected_scans
        ),
        cells=cells,
    )
