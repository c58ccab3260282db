"""``cytoedge train PATH``: heads from a labelled cases table, or a cell head from labelled
cells (docs/training.md, docs/cells.md); torch is imported inside the command only.
``cytoedge train segmenter FIELDS`` trains the segmenter instead
(export/train_segmenter_cli.py; TensorFlow inside the command only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance.cli.shared import (
    ConfigOption,
    check_signing_key,
    fail,
    setup,
    sign_written_version,
)

if TYPE_CHECKING:
    from rich.console import Console

    from appliance.config import Config
    from appliance.validation.cell_measures import CellFigures
    from appliance.validation.cohort import PipelineSettings
    from runtime.bundle_format import Bundle


def train(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="CASES|CELLS|segmenter",
            help="Cases table (CSV; docs/training.md), or labelled cells: class folders, a "
            "points table or images with QuPath GeoJSON (docs/cells.md); or the word "
            "`segmenter`, followed by FIELDS.",
        ),
    ],
    fields: Annotated[
        Path | None,
        typer.Argument(
            metavar="[FIELDS]",
            help="After `segmenter`: a folder of field photos with their cells annotated "
            "(instance labels, binary masks or QuPath GeoJSON; docs/training.md).",
        ),
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle whose encoder and segmenter to use (default: the configured)."),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="The new version (default: the base's next number).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder of the new version (default <data_dir>/bundles/<name>-<ver>)."),
    ] = None,
    folds: Annotated[
        int, typer.Option(min=2, help="Cross-validation folds, by patient (cells: by group).")
    ] = 5,
    indeterminate_band: Annotated[
        float,
        typer.Option(min=0.0, max=0.49, help="Calls within this distance of a threshold."),
    ] = 0.05,
    intended_use: Annotated[
        str | None, typer.Option(help="demo | research | clinical (default: the base's).")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Folder of the training report (default <data_dir>/validation/...)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of folds, initialisation and sampling.")] = 0,
    taxonomy: Annotated[
        str | None,
        typer.Option(help="Cells: the classes, a shipped taxonomy's name or a taxonomy file."),
    ] = None,
    target_accuracy: Annotated[
        float,
        typer.Option(
            min=0.5, max=1.0, help="Cells: out-of-fold accuracy the operating point must reach."
        ),
    ] = 0.99,
    pixel_size: Annotated[
        float | None,
        typer.Option(min=0.02, max=10.0, help="um/px of photos that state none (and no camera)."),
    ] = None,
    bag_classes: Annotated[
        str | None,
        typer.Option(
            help="Cases: the heads read only these cells, a group of the cell head's taxonomy "
            "(plasma_cells, white_cells) or comma-separated classes."
        ),
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option(help="Segmenter: a new network instead of fine-tuning the bundle's.")
    ] = False,
    start_from: Annotated[
        Path | None,
        typer.Option(
            help="Segmenter: the StarDist model folder to fine-tune (default: the one the "
            "bundle keeps).",
            file_okay=False,
        ),
    ] = None,
    adopt: Annotated[
        bool,
        typer.Option(help="Segmenter: write the new version even if worse on a held-out figure."),
    ] = False,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Cases: how the myeloma head learns, mil (gated attention on the cells; the "
            "default), patient-linear or patient-mlp (a probe on the patient embedding). "
            "Segmenter: a JSON file of recipe fields to change (epochs, batch_size, ...)."
        ),
    ] = None,
    compare_recipes: Annotated[
        bool,
        typer.Option(
            help="Cases: cross-validate every myeloma recipe the bundle allows on the same "
            "folds, in one report; --recipe's head is the one written."
        ),
    ] = False,
    align_patient_encoder: Annotated[
        Path | None,
        typer.Option(
            metavar="CHECKPOINT",
            help="Cases: instead of heads, align the bundle's patient encoder to the table's "
            "marker profiles (GenBloom's contrastive second stage); CHECKPOINT is the GenBloom "
            "file the bundle's patient encoder was exported from.",
            dir_okay=False,
        ),
    ] = None,
    align_tower: Annotated[
        Path | None,
        typer.Option(
            help="With --align-patient-encoder: the GenBloom-V file under a GenBloom-G "
            "checkpoint without vision_model.",
            dir_okay=False,
        ),
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(
            help="Segmenter: the run's folder, where an interrupted run resumes (default "
            "<data_dir>/training/segmenter/<name>-<version>).",
            file_okay=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Train heads on labelled cases, or a cell head on labelled cells: a new bundle version
    and its out-of-fold figures. `cytoedge train segmenter FIELDS` trains the segmenter on
    annotated fields and compares it with the current one before writing a version.

    Every scan, photo or crop is embedded by the base bundle's own cell path (cached: a
    second run embeds only what is new). Exit 0 when the new version is written; 1 when
    the input cannot train a head; 2 with one line for a bundle, table or cells that
    cannot be used.
    """
    from rich.console import Console

    from appliance.site.derived_versions import next_version, version_folder
    from appliance.validation.cohort import PipelineSettings
    from appliance.validation.labelled_cells import is_labelled_cells
    from export.train_run import RECIPES
    from runtime.bundle_format import BundleError, load_bundle

    if str(path) == "segmenter":
        if fields is None:
            raise fail("cytoedge train segmenter needs FIELDS: a folder of annotated fields")
        from export.train_segmenter_cli import SegmenterRun, train_segmenter_command

        train_segmenter_command(
            SegmenterRun(
                fields,
                bundle,
                version,
                out,
                report,
                work,
                pixel_size,
                from_scratch,
                start_from,
                adopt,
                Path(recipe) if recipe else None,
                seed,
                intended_use,
                config,
            )
        )
        return
    if fields is not None:
        raise fail(f"{fields}: a second path is for `cytoedge train segmenter FIELDS` only")
    if align_patient_encoder is not None and (
        bag_classes is not None or recipe or compare_recipes or taxonomy is not None
    ):
        raise fail(
            "--align-patient-encoder aligns the patient encoder on a cases table; train heads "
            "(--recipe, --compare-recipes, --bag-classes, --taxonomy) on the new version after"
        )
    recipe_name = recipe or "mil"
    if recipe_name not in RECIPES:
        raise fail(f"--recipe {recipe_name}: one of {', '.join(RECIPES)} for a cases table")
    cfg = setup(config)
    console = Console(stderr=True)
    try:
        base = load_bundle(bundle or cfg.bundle_dir)
    except BundleError as exc:
        raise fail(str(exc)) from None
    pipeline = PipelineSettings.from_config(cfg)
    if pixel_size is not None:  # the configuration's fallback, stated for this run
        calibration = dataclasses.replace(cfg.calibration, pixel_size_um=pixel_size, camera="")
        pipeline = dataclasses.replace(pipeline, calibration=calibration)
    new_version = version or next_version(base.version)
    destination = out or version_folder(cfg.data_dir / "bundles", base.name, new_version)
    folder = report or cfg.data_dir / "validation" / f"{base.name}-{new_version}" / "training"
    if destination.exists():
        raise fail(f"{destination} exists; choose another --version or --out")
    destination.parent.mkdir(parents=True, exist_ok=True)
    check_signing_key(cfg)
    where = _Destination(destination, new_version, folder, intended_use, seed, folds, cfg)
    if align_patient_encoder is not None:
        _align(path, base, pipeline, console, where, align_patient_encoder, align_tower)
    elif path.is_dir() or is_labelled_cells(path):
        if bag_classes is not None or recipe or compare_recipes:
            raise fail(
                "--bag-classes, --recipe and --compare-recipes are for case heads; labelled "
                "cells train the cell head"
            )
        if taxonomy is None:
            raise fail(f"{path}: labelled cells need --taxonomy (a shipped name or a file)")
        _train_cells(path, base, pipeline, console, where, taxonomy, target_accuracy)
    elif taxonomy is not None:
        raise fail(f"{path} is a cases table; --taxonomy names the classes of labelled cells")
    else:
        how = _CaseRecipe(indeterminate_band, bag_classes, recipe_name, compare_recipes)
        _train_cases(path, base, pipeline, console, where, how)


@dataclasses.dataclass(frozen=True)
class _Destination:
    """Where the new version and its figures go, and what it is."""

    folder: Path
    version: str
    report: Path
    intended_use: str | None
    seed: int
    folds: int
    config: Config  # the site's: its key signs the new version


@dataclasses.dataclass(frozen=True)
class _CaseRecipe:
    """How the case heads learn: the command's options for a cases table."""

    indeterminate_band: float
    bag_classes: str | None
    recipe: str
    compare: bool


def _train_cases(
    cases: Path,
    base: Bundle,
    pipeline: PipelineSettings,
    console: Console,
    where: _Destination,
    how: _CaseRecipe,
) -> None:
    from rich.console import Console

    from appliance.validation.cases_table import CasesTableError, read_cases_table
    from appliance.validation.summary import print_summary
    from export.onnx_export import ParityError
    from export.train_run import TrainingError, TrainOptions, bag_classes_of, train_bundle
    from runtime.bundle_format import BundleError

    try:
        table = read_cases_table(cases)
        bag = bag_classes_of(base, how.bag_classes) if how.bag_classes is not None else ()
    except (CasesTableError, TrainingError) as exc:
        raise fail(str(exc)) from None
    console.print(
        f"Training on {len(table)} cases of {cases} with the encoder and segmenter of "
        f"{base.name} {base.version}"
        + (f", bags of {', '.join(bag)}" if bag else "")
        + f"; the myeloma head's recipe: {how.recipe}"
        + (", every recipe compared on the same folds" if how.compare else "")
    )
    options = TrainOptions(
        folds=where.folds,
        indeterminate_band=how.indeterminate_band,
        seed=where.seed,
        bag_classes=bag,
        recipe=how.recipe,
        compare=how.compare,
    )
    try:
        result = train_bundle(
            table,
            base,
            pipeline,
            console,
            destination=where.folder,
            version=where.version,
            report_folder=where.report,
            options=options,
            intended_use=where.intended_use,
        )
    except (TrainingError, BundleError, ParityError) as exc:
        raise fail(str(exc), code=1) from None
    for case, reason in result.left_out.items():
        console.print(f"[yellow]left out[/yellow] {case}: {reason}")
    print_summary(result.report, Console())
    seconds = result.seconds
    console.print(
        f"Embedding {seconds['embedding']:.0f} s ({result.scans_embedded} scans embedded, "
        f"{result.scans_cached} from the cache), head training {seconds['heads']:.0f} s, "
        f"export {seconds['export']:.0f} s"
    )
    made = result.bundle
    console.print(
        f"Bundle {made.name} {made.version} ({made.intended_use}) at {made.path}, heads "
        f"{', '.join(made.head_names)}; report {result.files.html}"
    )
    console.print(sign_written_version(where.config, made))


def _align(
    cases: Path,
    base: Bundle,
    pipeline: PipelineSettings,
    console: Console,
    where: _Destination,
    checkpoint: Path,
    tower: Path | None,
) -> None:
    """``--align-patient-encoder``: export/patient_align.py, then the figures and signing."""
    from appliance.validation.cases_table import CasesTableError, read_cases_table
    from export.encoder import CheckpointError
    from export.onnx_export import ParityError
    from export.patient_align import AlignmentError, align_bundle, matching_encoder
    from runtime.bundle_format import BundleError

    try:
        table = read_cases_table(cases)
        with console.status(f"Checking {checkpoint} against {base.name} {base.version}..."):
            model = matching_encoder(checkpoint, base, tower)
    except (CasesTableError, CheckpointError, AlignmentError) as exc:
        raise fail(str(exc)) from None
    console.print(
        f"Aligning the patient encoder of {base.name} {base.version} to the marker profiles "
        f"of {len(table)} cases of {cases}"
    )
    try:
        result = align_bundle(
            table,
            base,
            model,
            checkpoint,
            pipeline,
            console,
            destination=where.folder,
            version=where.version,
            seed=where.seed,
            intended_use=where.intended_use,
        )
    except (AlignmentError, BundleError, ParityError) as exc:
        raise fail(str(exc), code=1) from None
    for case, reason in result.left_out.items():
        console.print(f"[yellow]left out[/yellow] {case}: {reason}")
    r = result.retrieval
    console.print(
        f"Held-out precision@{r.k} of the marker profile ({r.queries} cases against the "
        f"others): before {r.before:.3f}, after {r.after:.3f}, chance {r.chance:.3f}; "
        f"SupCon loss {result.loss[0]:.3f} -> {result.loss[1]:.3f}"
    )
    if result.dropped:
        console.print(
            f"Dropped {', '.join(result.dropped)}: probes learnt on the old patient embedding "
            "(train them again on this version with --recipe patient-linear)"
        )
    made = result.bundle
    console.print(
        f"Bundle {made.name} {made.version} ({made.intended_use}) at {made.path}, patient "
        f"encoder genbloom-g (projection, 128-d; {'; '.join(result.notes.values())}), heads "
        f"{', '.join(made.head_names) or 'none'}"
    )
    console.print(sign_written_version(where.config, made))


def _train_cells(
    path: Path,
    base: Bundle,
    pipeline: PipelineSettings,
    console: Console,
    where: _Destination,
    taxonomy_name: str,
    target_accuracy: float,
) -> None:
    from appliance.pipeline.networks import SlideNetworks
    from appliance.results import BundleRecord
    from appliance.validation.labelled_cells import LabelledCellsError, read_labelled_cells
    from appliance.validation.measures import build_report, cell_report
    from appliance.validation.report import write_validation_report
    from export.onnx_export import ParityError
    from export.train_cells import CellOptions, train_cell_head
    from export.train_run import TrainingError
    from runtime.bundle_format import BundleError
    from runtime.taxonomy import TaxonomyError, load_taxonomy

    try:
        taxonomy = load_taxonomy(taxonomy_name)
    except TaxonomyError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"Training a cell head on the labelled cells of {path} ({taxonomy.name}) with the "
        f"encoder and segmenter of {base.name} {base.version}"
    )
    try:
        with SlideNetworks(base, pipeline.runtime) as networks:
            cells = read_labelled_cells(path, taxonomy, networks, pipeline, console)
    except LabelledCellsError as exc:
        raise fail(str(exc)) from None
    options = CellOptions(folds=where.folds, target_accuracy=target_accuracy, seed=where.seed)
    try:
        result = train_cell_head(
            cells,
            base,
            console,
            destination=where.folder,
            version=where.version,
            source=path.name,
            options=options,
            intended_use=where.intended_use,
        )
    except (TrainingError, BundleError, ParityError) as exc:
        raise fail(str(exc), code=1) from None
    for name, reason in result.left_out.items():
        console.print(f"[yellow]left out of the head[/yellow] class {name}: {reason}")
    made = result.bundle
    assert made.cell_head is not None
    report = build_report(
        (),
        BundleRecord(made.name, made.version, made.sha256, made.intended_use),
        (),
        kind="out-of-fold",
        table=None,
        cells=cell_report(made.cell_head, result.figures, path.name),
    )
    files = write_validation_report(where.report, report, None)
    _print_figures(result.figures, where.folds, console)
    console.print(
        f"Bundle {made.name} {made.version} ({made.intended_use}) at {made.path}, cell head "
        f"of {len(made.cell_classes)} classes; out-of-fold report {files.html}"
    )
    console.print(sign_written_version(where.config, made))


def _print_figures(figures: CellFigures, folds: int, console: Console) -> None:
    point = figures.operating_point
    console.print(
        f"Out of fold ({folds} folds by group, {figures.cells} cells): accuracy "
        f"{figures.accuracy:.3f}, macro F1 {figures.macro_f1:.3f}, weighted F1 "
        f"{figures.weighted_f1:.3f}"
    )
    reached = (
        f"reaches {figures.target_accuracy:.1%}"
        if point.reached
        else f"does not reach {figures.target_accuracy:.1%}: only the surest cells are called"
    )
    console.print(
        f"Operating point: confidence {point.confidence:.3f} calls {point.coverage:.1%} of the "
        f"cells at {point.accuracy:.1%} accuracy ({reached}); the rest are unsure"
    )
    console.print(
        f"Critical errors: {figures.critical_errors} cells, {figures.critical_errors_sure} of "
        "them at or above the operating point"
    )
