"""``cytoedge validate BUNDLE CASES``: a bundle against a site's labelled cases, or its
cell head against labelled cells.

Scores every case of the table as the service would, writes the validation report
(report.json, report.html, report.pdf, pictures), and on request chooses new
thresholds on these cases as a new bundle version (``--recalibrate``) and records
that this site verified the bundle (``--verified-by``). Given labelled cells instead
(``labelled_cells.is_labelled_cells``), it classifies them with the bundle's cell
head, writes the cell figures' report, and ``--recalibrate`` chooses a new operating
point. No torch here.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from appliance.cli.shared import (
    ConfigOption,
    check_signing_key,
    fail,
    setup,
    sign_written_version,
)
from appliance.config import Config
from runtime.bundle_format import Bundle


def validate(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="The bundle folder.")],
    cases: Annotated[
        Path,
        typer.Argument(
            metavar="CASES",
            help="Cases table (CSV; docs/training.md), or labelled cells (docs/cells.md).",
        ),
    ],
    report: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the report (default <data_dir>/validation/<bundle>/<table>-<time>)."
        ),
    ] = None,
    recalibrate: Annotated[
        bool,
        typer.Option(
            help="Choose new thresholds on these cases (on cells: a new operating point); "
            "write them as a new version."
        ),
    ] = False,
    target_sensitivity: Annotated[
        list[str] | None,
        typer.Option(
            help="With --recalibrate: TASK=SENSITIVITY instead of Youden's index; repeatable."
        ),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="The recalibrated version (default: the next number).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder of the recalibrated bundle (default beside the others)."),
    ] = None,
    verified_by: Annotated[
        str | None,
        typer.Option(help="Record that this site verified BUNDLE on these cases, and by whom."),
    ] = None,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for AUC CIs.")] = (
        2000
    ),
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    config: ConfigOption = None,
) -> None:
    """Score labelled cases (or classify labelled cells) with a bundle and write the
    validation report.

    Exit 0 when the report is written (cases without a call are in it); 2 with one
    line for a bundle, table or cells that cannot be used.
    """
    from appliance.site.derived_versions import next_version, version_folder
    from appliance.validation.cases_table import CasesTableError, read_cases_table
    from appliance.validation.cohort import PipelineSettings
    from appliance.validation.labelled_cells import is_labelled_cells
    from appliance.validation.recalibrate import (
        RecalibrationError,
        new_thresholds,
        parse_targets,
        write_recalibrated,
    )
    from appliance.validation.run import default_report_folder, validate_bundle
    from appliance.validation.summary import print_summary
    from runtime.bundle_format import BundleError, load_bundle

    cfg = setup(config)
    console = Console(stderr=True)
    if recalibrate:
        check_signing_key(cfg)
    if is_labelled_cells(cases):
        if target_sensitivity:
            raise fail("--target-sensitivity is for cases; cells keep the head's target accuracy")
        try:
            bundle = load_bundle(bundle_path)
        except BundleError as exc:
            raise fail(str(exc)) from None
        _validate_cells(cfg, bundle, cases, report, recalibrate, version, out, verified_by)
        return
    try:
        bundle = load_bundle(bundle_path)
        table = read_cases_table(cases)
        targets = parse_targets(target_sensitivity or [])
    except (BundleError, CasesTableError, RecalibrationError) as exc:
        raise fail(str(exc)) from None
    if targets and not recalibrate:
        raise fail("--target-sensitivity chooses thresholds: give it with --recalibrate")
    folder = report or default_report_folder(cfg, bundle, table.path)
    console.print(f"Validating {bundle.name} {bundle.version} on {len(table)} cases of {cases}")
    run = validate_bundle(
        bundle,
        table,
        PipelineSettings.from_config(cfg),
        console,
        folder=folder,
        resamples=resamples,
        seed=seed,
    )
    print_summary(run.report, Console())
    console.print(f"Report: {run.files.html}" + (f" and {run.files.pdf}" if run.files.pdf else ""))
    if recalibrate:
        new_version = version or next_version(bundle.version)
        destination = out or version_folder(cfg.data_dir / "bundles", bundle.name, new_version)
        try:
            thresholds = new_thresholds(bundle, run.report, targets)
            made = write_recalibrated(
                bundle, run.report, thresholds, targets, destination, new_version
            )
        except (RecalibrationError, BundleError) as exc:
            raise fail(str(exc)) from None
        for head in made.heads:
            before = bundle.head(head.name).thresholds
            for task, value in head.thresholds.items():
                console.print(f"{head.name}: {head.label(task)}: {before[task]:.3f} -> {value:.3f}")
        console.print(
            f"Recalibrated bundle {made.name} {made.version} at {made.path} "
            f"({bundle.version} untouched); validate it on other cases before use"
        )
        console.print(sign_written_version(cfg, made))
    if verified_by:
        summary = "; ".join(
            f"{t.head}:{t.task} AUC {t.auc:.3f}" for t in run.report.tasks if t.auc is not None
        )
        _record_verification(
            cfg,
            bundle,
            verified_by,
            f"{run.report.cases} cases of {table.path.name} ({table.sha256[:12]}): "
            f"{summary or 'no task measured'}; report {run.files.json}",
            console,
        )


def _validate_cells(
    cfg: Config,
    bundle: Bundle,
    labelled: Path,
    report: Path | None,
    recalibrate: bool,
    version: str | None,
    out: Path | None,
    verified_by: str | None,
) -> None:
    """``validate`` on labelled cells: the report, then the options as for cases."""
    from appliance.site.derived_versions import next_version, version_folder
    from appliance.validation.cell_run import CellValidationError, cell_head_of, validate_cells
    from appliance.validation.cohort import PipelineSettings
    from appliance.validation.labelled_cells import LabelledCellsError
    from appliance.validation.recalibrate import (
        RecalibrationError,
        new_operating_point,
        write_recalibrated_cell_head,
    )
    from appliance.validation.run import default_report_folder
    from appliance.validation.summary import print_summary
    from runtime.bundle_format import BundleError
    from runtime.head_kinds.cell_classifier import CONFIDENCE

    console = Console(stderr=True)
    try:
        spec = cell_head_of(bundle)
        console.print(f"Validating the cell head of {bundle.name} {bundle.version} on {labelled}")
        run = validate_cells(
            bundle,
            labelled,
            PipelineSettings.from_config(cfg),
            console,
            folder=report or default_report_folder(cfg, bundle, labelled),
        )
    except (CellValidationError, LabelledCellsError) as exc:
        raise fail(str(exc)) from None
    cells = run.cells
    print_summary(run.report, Console())
    console.print(f"Report: {run.files.html}" + (f" and {run.files.pdf}" if run.files.pdf else ""))
    if recalibrate:
        new_version = version or next_version(bundle.version)
        destination = out or version_folder(cfg.data_dir / "bundles", bundle.name, new_version)
        try:
            point = new_operating_point(spec, run.truth, run.probabilities)
            made = write_recalibrated_cell_head(bundle, cells, point, destination, new_version)
        except (RecalibrationError, BundleError) as exc:
            raise fail(str(exc)) from None
        console.print(
            f"{spec.name}: operating point {spec.thresholds[CONFIDENCE]:.3f} -> "
            f"{point.confidence:.3f} (coverage {point.coverage:.3f}, accuracy {point.accuracy:.3f})"
        )
        console.print(
            f"Recalibrated bundle {made.name} {made.version} at {made.path} "
            f"({bundle.version} untouched); validate it on other cells before use"
        )
        console.print(sign_written_version(cfg, made))
    if verified_by:
        figures = cells.figures
        point = figures.operating_point
        _record_verification(
            cfg,
            bundle,
            verified_by,
            f"{figures.cells} labelled cells of {cells.source}: macro F1 "
            f"{figures.macro_f1:.3f}, weighted F1 {figures.weighted_f1:.3f}, accuracy "
            f"{point.accuracy:.3f} at coverage {point.coverage:.3f} (operating point "
            f"{point.confidence:.3f}), {figures.critical_errors} critical errors; "
            f"report {run.files.json}",
            console,
        )


def _record_verification(
    cfg: Config, bundle: Bundle, verified_by: str, summary: str, console: Console
) -> None:
    """This site verified ``bundle`` (``--verified-by``), with what it was verified on."""
    from appliance.site.verification import VerificationRecord, write_verification

    record = VerificationRecord(
        bundle_sha256=bundle.sha256,
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        verified_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        verified_by=verified_by,
        summary=summary,
    )
    path = write_verification(cfg.data_dir, record)
    console.print(f"Recorded: {bundle.name} {bundle.version} verified on this site ({path})")
