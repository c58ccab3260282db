"""``cytoedge train``: a new bundle version whose heads learnt from a labelled cases table.

1. Every scan goes through the appliance's own slide pipeline with the base
   bundle's encoder and segmenter (``appliance.validation.cohort``: the code and slide cache
   of ``cytoedge score``), so a head learns from exactly what it will be given;
   scans embedded before (by any version with the same encoder and segmenter)
   are read back from the cache.
2. Each kind of head the table has labels for (the myeloma markers: gated
   attention MIL on slide scans; a peripheral-blood diagnosis: the transformer on
   single-cell folders) is cross-validated at patient level
   (``export.cross_validate``): its k fold models are the shipped ensemble,
   calibration and thresholds are fitted on their out-of-fold predictions. With
   ``bag_classes`` (``--bag-classes``: plasma cells for a myeloma head) each head
   learns on the bag it will score, the kept cells the base's cell head puts in those
   classes (``CohortCase.bag``, as scoring takes it), and its section says so; a case
   with too few of them is left out, as scoring would abstain.
   ``recipe`` (``--recipe``) chooses how the myeloma markers are learnt: gated-attention
   MIL on the cell bag (``mil``), or a probe on each case's patient embedding
   (``patient-linear``, ``patient-mlp``: export/train_patient.py, for sites with few
   cases). With ``compare`` every marker recipe the base allows is cross-validated on
   the same cases, hence the same folds, and reported side by side; only ``recipe``'s
   head is written.
3. The members are exported to ONNX behind their parity gates and written with
   the base's other files as a new version (``appliance.site.derived_versions``);
   ``bundle.json``'s provenance records the table's hash, the cases and positives
   per task, the recipes and the out-of-fold figures.
4. The out-of-fold predictions go through the validation report
   (``appliance.validation``), the same figures ``cytoedge validate`` gives.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from appliance.console import new_progress
from appliance.pipeline.cases import abstain_reason, case_inputs, head_record, inputs_words
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.patients import embed_patient, patient_encoder_sha256
from appliance.results import BundleRecord, HeadRecord
from appliance.site.derived_versions import derived_from, write_bundle_version
from appliance.validation.cases_table import CasesTable
from appliance.validation.cohort import CohortCase, PipelineSettings, process_cohort
from appliance.validation.measures import (
    ClassFigures,
    ValidationCase,
    ValidationReport,
    build_report,
)
from appliance.validation.report import ReportFiles, write_validation_report
from export.cross_validate import CrossValidation, cross_validate
from export.onnx_export import export_heads
from export.train_gated import GatedObjective, GatedRecipe
from export.train_heads import Objective, Targets
from export.train_patient import PatientProbeObjective, PatientProbeRecipe
from export.train_transformer import TransformerObjective, TransformerRecipe
from runtime.bundle_format import Bundle, HeadSpec
from runtime.head_kinds import Truth
from runtime.heads import HeadResult

PROVENANCE_KEY = "training"
# Keys of the base's provenance that describe its heads, not carried into a new version.
HEAD_PROVENANCE = ("training", "recalibration", "heads")
FIGURES = ("auc", "auc_low", "auc_high", "ece")
# How the myeloma marker head learns (``--recipe``): gated-attention MIL on the cell bag,
# or a probe on the patient embedding (linear, or one hidden layer). The blood head is
# the transformer in every recipe.
RECIPES = ("mil", "patient-linear", "patient-mlp")
PROBE_HIDDEN = 64  # patient-mlp's hidden layer


class TrainingError(ValueError):
    """A cohort that cannot train a head; one line."""


@dataclass(frozen=True)
class TrainOptions:
    folds: int = 5
    indeterminate_band: float = 0.05
    seed: int = 0
    gated: GatedRecipe = field(default_factory=GatedRecipe)
    transformer: TransformerRecipe = field(default_factory=TransformerRecipe)
    patient: PatientProbeRecipe = field(default_factory=PatientProbeRecipe)
    resamples: int = 2000
    # The cell-head classes every head on cells reads (``HeadSpec.bag_classes``); none: all
    bag_classes: tuple[str, ...] = ()
    recipe: str = "mil"  # one of RECIPES
    # Every marker recipe cross-validated on the same folds for the report; ``recipe``'s
    # head is the one written
    compare: bool = False


@dataclass
class TrainedHead:
    spec: HeadSpec
    objective: Objective
    recipe: str
    cases: list[int]  # rows of the cohort it learnt from
    validation: CrossValidation
    targets: Targets
    parity: list[dict[str, Any]]
    bag_cells: dict[str, int]  # case id -> the cells of its bag
    shipped: bool = True  # False: a recipe cross-validated for the report only


@dataclass
class TrainResult:
    bundle: Bundle
    report: ValidationReport
    files: ReportFiles
    seconds: dict[str, float]
    left_out: dict[str, str]  # case id -> why no head learnt from it
    scans_embedded: int
    scans_cached: int


def bag_classes_of(base: Bundle, text: str) -> tuple[str, ...]:
    """The cell-head classes ``--bag-classes`` names: a group of the base's taxonomy
    (``plasma_cells``, ``white_cells``) or comma-separated class names, in the cell
    head's order; TrainingError (one line) for a base without a cell head or a name it
    does not know."""
    head = base.cell_head
    if head is None:
        raise TrainingError(
            f"--bag-classes: {base.name} {base.version} has no cell head to classify the "
            "cells by; train one on labelled cells first (docs/cells.md)"
        )
    taxonomy = head.head_kind.params(head).taxonomy
    wanted = set(taxonomy.group(text.strip())) or {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(wanted - set(base.cell_classes))
    if unknown or not wanted:
        groups = ", ".join(taxonomy.groups) or "none"
        raise TrainingError(
            f"--bag-classes: {', '.join(unknown) or repr(text)} is neither a group of the cell "
            f"head's taxonomy ({groups}) nor one of its classes ({', '.join(base.cell_classes)})"
        )
    return tuple(name for name in base.cell_classes if name in wanted)


def case_bag(
    case: CohortCase, base: Bundle, bag_classes: tuple[str, ...]
) -> tuple[np.ndarray, str | None]:
    """A case's bag for a head reading ``bag_classes`` (as scoring takes it), and why the
    case is left out when the bag holds fewer cells than the bundle needs (as scoring
    would abstain), else None."""
    bag = case.bag(base, bag_classes)
    reason = abstain_reason(len(bag), base.cells.min_cells, [], 1, [], of_classes=bag_classes)
    return bag, reason


def _visiting(base: Bundle, table: CasesTable, options: TrainOptions) -> Bundle:
    """The base as the new version will visit a scan: each head on cells the table trains
    reads ``bag_classes``, so the scan's cell budget counts those classes
    (``Bundle.budget_classes``) and the bags learnt on are the bags scored."""
    if not options.bag_classes:
        return base
    trained = []
    for objective, recipe in _objectives(base, options):
        if not _written(objective, recipe, options):
            continue  # compared only: the new version will not visit scans for it
        spec = objective.provisional_spec(_head_name(base, objective))
        if any(objective.usable(spec.head_kind.truth(spec, c.labels)) for c in table.cases):
            bag = options.bag_classes if objective.reads == "cells" else ()
            trained.append(dataclasses.replace(spec, bag_classes=bag))
    names = {spec.name for spec in trained}
    kept = tuple(head for head in base.heads if head.name not in names)
    return dataclasses.replace(base, heads=(*trained, *kept))


def _marker_objective(base: Bundle, recipe: str, options: TrainOptions) -> Objective:
    if recipe == "mil":
        return GatedObjective(options.gated)
    if base.patient_encoder is None:
        raise TrainingError(
            f"--recipe {recipe}: {base.name} {base.version} has no patient encoder; add one "
            "with cytoedge export patient-encoder (docs/bundles.md)"
        )
    hidden = PROBE_HIDDEN if recipe == "patient-mlp" else 0
    probe = dataclasses.replace(options.patient, hidden_dim=hidden)
    return PatientProbeObjective(patient_encoder_sha256(base), probe)


def _objectives(base: Bundle, options: TrainOptions) -> list[tuple[Objective, str]]:
    """(objective, recipe) of every head this run fits: the chosen recipe's marker head
    first, then (with ``compare``) the other marker recipes the base can train, then the
    blood head."""
    if options.recipe not in RECIPES:
        raise TrainingError(f"--recipe {options.recipe!r}: one of {', '.join(RECIPES)}")
    recipes = [options.recipe]
    if options.compare:
        usable = [r for r in RECIPES if r == "mil" or base.patient_encoder is not None]
        recipes += [r for r in usable if r != options.recipe]
    markers = [(_marker_objective(base, r, options), r) for r in recipes]
    return [*markers, (TransformerObjective(options.transformer), "mil")]


def _written(objective: Objective, recipe: str, options: TrainOptions) -> bool:
    """Whether the head goes into the new version: every head but the marker recipes
    cross-validated for comparison only."""
    return not isinstance(objective, GatedObjective) or recipe == options.recipe


def _head_name(base: Bundle, objective: Objective) -> str:
    """The base's head that predicts the same keeps its name (this version replaces it)."""
    same = [h.name for h in base.heads if h.kind in (objective.kind, *objective.replaces)]
    return same[0] if same else objective.default_name


def _left_out_note(left_out: dict[str, str]) -> str:
    """The cases left out so far, for an error that may come from them."""
    if not left_out:
        return ""
    shown = "; ".join(f"{case}: {why}" for case, why in list(left_out.items())[:3])
    more = f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
    return f" ({len(left_out)} cases left out: {shown}{more})"


def _check_enough(
    name: str, objective: Objective, targets: Targets, k: int, left_out: dict[str, str]
) -> None:
    strata = objective.strata(targets)
    if len(strata) < 2 * k:
        raise TrainingError(
            f"head {name}: {len(strata)} usable cases; {k}-fold training needs at least {2 * k}"
            + _left_out_note(left_out)
        )
    counts = objective.describe(targets)
    positives = counts.get("positives", {})
    labelled = counts.get("labelled", {})
    for task, n in positives.items():
        negatives = labelled[task] - n
        if n < 2 or negatives < 2:
            raise TrainingError(
                f"head {name}: {task} has {n} positive and {negatives} negative cases; "
                "training needs at least 2 of each (leave the column out to train without it)"
                + _left_out_note(left_out)
            )
    classes = counts.get("classes", {})
    if classes and sum(1 for n in classes.values() if n) < 2:
        raise TrainingError(f"head {name}: the cases hold one diagnosis; training needs two")


def train_bundle(
    table: CasesTable,
    base: Bundle,
    pipeline: PipelineSettings,
    console: Console,
    *,
    destination: Path,
    version: str,
    report_folder: Path,
    options: TrainOptions | None = None,
    intended_use: str | None = None,
) -> TrainResult:
    """Embed, cross-validate, export and write the new version; then its report."""
    options = options or TrainOptions()
    objectives = _objectives(base, options)
    started = time.perf_counter()
    with SlideNetworks(_visiting(base, table, options), pipeline.runtime) as networks:
        cohort = process_cohort(table, networks, pipeline, console)
    patients: dict[str, np.ndarray] = {}
    if any(objective.reads == "patient" for objective, _ in objectives):
        patients = _patient_embeddings(base, cohort, pipeline, console)
    seconds = {"embedding": round(time.perf_counter() - started, 1)}
    left_out: dict[str, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".train-", dir=destination.parent) as work:
        fitted = _fit_heads(base, objectives, cohort, patients, options, Path(work), console)
        left_out = fitted.left_out
        trained = [head for head in fitted.heads if head.shipped]
        if not trained:
            raise TrainingError(
                f"{table.path}: no case can train a head "
                + ("; ".join(f"{case}: {why}" for case, why in left_out.items()) or "")
            )
        training = sum(t.validation.seconds for t in fitted.heads)
        seconds["heads"] = round(training, 1)
        seconds["export"] = round(time.perf_counter() - started - training, 1)
        replaced = {t.spec.name for t in trained}
        heads = [t.spec for t in trained] + [h for h in base.heads if h.name not in replaced]
        compared = [t.spec for t in fitted.heads if not t.shipped]
        identity = BundleRecord(base.name, version, "", intended_use or base.intended_use)
        cases = _out_of_fold_cases(cohort, fitted.heads, left_out)
        report = build_report(
            [*heads, *compared],
            identity,
            cases,
            kind="out-of-fold",
            table=table,
            resamples=options.resamples,
            seed=options.seed,
        )
        if compared:
            recipes = {
                t.spec.name: t.recipe
                for t in fitted.heads
                if isinstance(t.objective, GatedObjective)  # a marker recipe
            }
            report = dataclasses.replace(report, recipes=recipes)
        record = _provenance(base, table, fitted.heads, report, options, seconds, left_out)
        provenance = {
            **{k: v for k, v in base.provenance.items() if k not in HEAD_PROVENANCE},
            PROVENANCE_KEY: record,
        }
        files = {
            rel: Path(work) / "heads" / Path(rel).name for t in trained for rel in t.spec.files
        }
        bundle = write_bundle_version(
            base,
            destination,
            version=version,
            heads=heads,
            head_files=files,
            provenance=provenance,
            intended_use=intended_use,
        )
    report = dataclasses.replace(report, bundle_sha256=bundle.sha256)
    written = write_validation_report(report_folder, report, table)
    slides = [s for case in cohort for s in case.slides]
    return TrainResult(
        bundle,
        report,
        written,
        seconds,
        left_out,
        scans_embedded=sum(not s.from_cache for s in slides),
        scans_cached=sum(s.from_cache for s in slides),
    )


def _patient_embeddings(
    base: Bundle, cohort: Sequence[CohortCase], pipeline: PipelineSettings, console: Console
) -> dict[str, np.ndarray]:
    """Each case's patient embedding as scoring makes it (``embed_patient``), by case id;
    a case without kept cells has none."""
    embeddings = {}
    with new_progress(console) as progress:
        task = progress.add_task("patient embeddings", total=len(cohort))
        for case in cohort:
            kept = {s.slide_id: s.cells() for s in case.slides if s.qc_passed}
            made = embed_patient(base, kept, pipeline.runtime)
            if made is not None:
                embeddings[case.case_id] = made[0]
            progress.advance(task)
    return embeddings


@dataclass
class _HeadInputs:
    """What one objective can learn from: each usable case's row, truth and bag."""

    name: str
    truths: list[Truth]
    bags: dict[int, np.ndarray]  # row of the cohort -> its bag (cells, or the patient row)
    reasons: dict[str, str]  # case id -> why it is left out


@dataclass
class _Fitted:
    heads: list[TrainedHead]
    left_out: dict[str, str]


def _head_inputs(
    base: Bundle,
    objective: Objective,
    cohort: Sequence[CohortCase],
    patients: dict[str, np.ndarray],
    options: TrainOptions,
) -> _HeadInputs:
    name = _head_name(base, objective)
    provisional = objective.provisional_spec(name)
    kind = provisional.head_kind
    truths = [kind.truth(provisional, case.case.labels) for case in cohort]
    bags: dict[int, np.ndarray] = {}
    reasons: dict[str, str] = {}
    for row, (case, truth) in enumerate(zip(cohort, truths, strict=True)):
        if not objective.usable(truth):
            continue
        reason = case.left_out(base.cells.min_cells)
        if reason is None and not case_inputs(case.slides) <= set(objective.inputs):
            found = inputs_words(case_inputs(case.slides))
            reason = f"holds {found}; the {name} head learns from {inputs_words(objective.inputs)}"
        bag = None
        if reason is None and objective.reads == "patient":
            bag = patients[case.case_id][None] if case.case_id in patients else None
            reason = None if bag is not None else "no kept cell for a patient embedding"
        elif reason is None:
            bag, reason = case_bag(case, base, options.bag_classes)
        if reason is None and bag is not None:
            bags[row] = bag
        else:
            reasons[case.case_id] = reason or "no bag"
    return _HeadInputs(name, truths, bags, reasons)


def _fit_heads(
    base: Bundle,
    objectives: Sequence[tuple[Objective, str]],
    cohort: Sequence[CohortCase],
    patients: dict[str, np.ndarray],
    options: TrainOptions,
    work: Path,
    console: Console,
) -> _Fitted:
    """Every objective cross-validated; the marker recipes compared learn from the same
    cases, so ``stratified_folds`` (same strata, same seed) gives them the same folds."""
    inputs = [_head_inputs(base, o, cohort, patients, options) for o, _ in objectives]
    # the marker recipes (a probe's objective is the gated head's on another network)
    markers = [i for i, (o, _) in enumerate(objectives) if isinstance(o, GatedObjective)]
    if len(markers) > 1:
        common = set.intersection(*(set(inputs[i].bags) for i in markers))
        for i in markers:
            for row in set(inputs[i].bags) - common:
                case_id = cohort[row].case_id
                why = next(
                    inputs[j].reasons[case_id] for j in markers if case_id in inputs[j].reasons
                )
                inputs[i].reasons[case_id] = f"{why} (so no recipe compared learns from it)"
                del inputs[i].bags[row]
    left_out: dict[str, str] = {}
    heads = []
    for (objective, recipe), found in zip(objectives, inputs, strict=True):
        shipped = _written(objective, recipe, options)
        if not any(objective.usable(t) for t in found.truths):
            continue
        name = found.name if shipped else f"{found.name}.{recipe}"
        heads.append(
            _train_head(objective, recipe, name, cohort, found, options, work, console, shipped)
        )
        for case_id, why in found.reasons.items():
            left_out.setdefault(case_id, why)
    return _Fitted(heads, left_out)


def _train_head(
    objective: Objective,
    recipe: str,
    name: str,
    cohort: Sequence[CohortCase],
    found: _HeadInputs,
    options: TrainOptions,
    work: Path,
    console: Console,
    shipped: bool,
) -> TrainedHead:
    """Cross-validate one head; export it when it is the one shipped."""
    rows = sorted(found.bags)
    bags = [found.bags[r] for r in rows]
    targets = objective.targets([found.truths[r] for r in rows])
    _check_enough(name, objective, targets, options.folds, found.reasons)
    with new_progress(console) as progress:
        task = progress.add_task(f"head {name} ({recipe}): {options.folds} folds", total=1.0)
        validation = cross_validate(
            objective,
            bags,
            targets,
            k=options.folds,
            seed=options.seed,
            progress=lambda fraction: progress.update(task, completed=fraction),
        )
    files, parity = ["-"], []  # a recipe compared, not shipped: no files
    if shipped:
        with console.status(f"Exporting the {options.folds} members of {name} (parity-gated)..."):
            paths, reports = export_heads(validation.members, work / "heads", name)
        files = [f"heads/{p.name}" for p in paths]
        parity = [r.metrics for r in reports]
    spec = objective.head_spec(
        name, files, validation.raw, validation.extra, targets, options.indeterminate_band
    )
    learnt_from = set().union(*(case_inputs(cohort[r].slides) for r in rows))
    bag_classes = options.bag_classes if objective.reads == "cells" else ()
    spec = dataclasses.replace(spec, inputs=objective.scores(learnt_from), bag_classes=bag_classes)
    bag_cells = {cohort[r].case_id: len(bag) for r, bag in zip(rows, bags, strict=True)}
    return TrainedHead(
        spec, objective, recipe, rows, validation, targets, parity, bag_cells, shipped
    )


def _out_of_fold_records(head: TrainedHead) -> dict[int, HeadRecord]:
    """Each case's out-of-fold outputs read by the head's kind, as scoring reads them."""
    spec, kind = head.spec, head.spec.head_kind
    records = {}
    for index, row in enumerate(head.cases):
        calibrated = kind.calibrate(spec, head.validation.raw[index])
        probabilities = {o: float(p) for o, p in zip(spec.outputs, calibrated, strict=True)}
        extra = {name: np.asarray(values[index]) for name, values in head.validation.extra.items()}
        reading = kind.interpret(spec, probabilities, extra)
        result = HeadResult(
            head=spec.name,
            kind=spec.kind,
            probabilities=probabilities,
            attention=np.zeros(0, np.float32),
            predictions=reading.predictions,
            findings=reading.findings,
            member_probabilities=head.validation.raw[index][None].astype(np.float32),
        )
        records[row] = head_record(result)
    return records


def _out_of_fold_cases(
    cohort: Sequence[CohortCase], trained: Sequence[TrainedHead], left_out: dict[str, str]
) -> list[ValidationCase]:
    by_head = [_out_of_fold_records(head) for head in trained]
    cases = []
    for row, case in enumerate(cohort):
        heads = {r[row].name: r[row] for r in by_head if row in r}
        reason = left_out.get(case.case_id)
        status = "scored" if heads else ("rejected" if not case.slides else "abstained")
        cases.append(
            ValidationCase(
                case.case_id,
                case.case.labels,
                status,
                None if heads else reason or "no head learns from its labels",
                heads,
                tuple(f"{p.name}: {why}" for p, why in case.rejected),
            )
        )
    return cases


def _provenance(
    base: Bundle,
    table: CasesTable,
    trained: Sequence[TrainedHead],
    report: ValidationReport,
    options: TrainOptions,
    seconds: dict[str, float],
    left_out: dict[str, str],
) -> dict[str, Any]:
    # A head this run keeps (one of a kind it does not train) keeps its training record;
    # a recipe cross-validated only for comparison is recorded beside the heads.
    replaced = {head.spec.name for head in trained}
    compared: dict[str, Any] = {}
    earlier = base.provenance.get(PROVENANCE_KEY, {}).get("heads", {})
    heads = {
        name: record
        for name, record in earlier.items()
        if name in base.head_names and name not in replaced
    }
    for head in trained:
        tasks = {
            t.task: {k: getattr(t, k) for k in FIGURES}
            | {
                "sensitivity": t.sensitivity.value,
                "specificity": t.specificity.value,
                "threshold": t.threshold,
            }
            for t in report.tasks
            if t.head == head.spec.name
        }
        # the fold each case was tested in: recipes compared share them
        test_fold = {
            case: int(fold)
            for case, fold in zip(head.bag_cells, head.validation.folds, strict=True)
        }
        out_of_fold: dict[str, Any] = {"tasks": tasks, "test_fold": test_fold}
        for figures in report.classes:
            if figures.head == head.spec.name:
                out_of_fold["classes"] = _class_figures(figures)
        if not head.shipped:
            compared[head.spec.name] = {"recipe_name": head.recipe, "out_of_fold": out_of_fold}
            continue
        heads[head.spec.name] = {
            "kind": head.spec.kind,
            "inputs": head.spec.inputs,
            "bag_classes": head.spec.bag_classes,
            "bag_cells": head.bag_cells,
            **head.objective.describe(head.targets),
            "folds": options.folds,
            "epochs_run": head.validation.epochs,
            "recipe_name": head.recipe,
            "recipe": asdict(head.objective.recipe),
            "out_of_fold": out_of_fold,
            "parity": head.parity,
        }
    return {
        "derived_from": derived_from(base),
        "cases_table": table.name,
        "cases_table_sha256": table.sha256,
        "cases": len(table),
        "left_out": left_out,
        "heads": heads,
        **({"recipes_compared": compared} if compared else {}),
        "seed": options.seed,
        "indeterminate_band": options.indeterminate_band,
        "seconds": seconds,
    }


def _class_figures(figures: ClassFigures) -> dict[str, Any]:
    return {
        "macro_recall": figures.macro_recall,
        "top1": figures.top1,
        "top2": figures.top2,
        "ece": figures.ece,
        "recall": figures.recall,
        "confusion": [list(row) for row in figures.confusion],
    }
