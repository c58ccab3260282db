"""``cytoedge validate``'s work: a labelled cases table scored with a bundle, the report."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from appliance.config import Config
from appliance.pipeline.networks import SlideNetworks
from appliance.results import BundleRecord
from appliance.validation import metrics
from appliance.validation.cases_table import CasesTable
from appliance.validation.cohort import CohortCase, PipelineSettings, process_cohort
from appliance.validation.measures import ValidationReport, build_report
from appliance.validation.report import ReportFiles, write_validation_report
from appliance.validation.scoring import score_cohort
from runtime.bundle_format import Bundle

CASES_FOLDER = "cases"  # the report's copy of what the service would have written


@dataclass(frozen=True)
class ValidationRun:
    report: ValidationReport
    files: ReportFiles
    cohort: tuple[CohortCase, ...]


def default_report_folder(config: Config, bundle: Bundle, labelled: Path) -> Path:
    """``<data_dir>/validation/<name>-<version>/<table or cells>-<UTC time>``: one per run."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return (
        config.data_dir
        / "validation"
        / f"{bundle.name}-{bundle.version}"
        / f"{labelled.stem}-{stamp}"
    )


def validate_bundle(
    bundle: Bundle,
    table: CasesTable,
    pipeline: PipelineSettings,
    console: Console,
    *,
    folder: Path,
    resamples: int = metrics.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    pdf: bool = True,
) -> ValidationRun:
    """Process the table's scans (cached), score every case as the service would (its
    result folder under ``folder/cases``), and write the report into ``folder``."""
    with SlideNetworks(bundle, pipeline.runtime) as networks:
        cohort = process_cohort(table, networks, pipeline, console)
    with console.status("Scoring the cases and writing the report..."):
        cases = score_cohort(cohort, bundle, folder / CASES_FOLDER, pipeline.runtime)
        report = build_report(
            bundle.heads,
            BundleRecord(bundle.name, bundle.version, bundle.sha256, bundle.intended_use),
            cases,
            kind="validation",
            table=table,
            resamples=resamples,
            seed=seed,
        )
        files = write_validation_report(folder, report, table, pdf=pdf)
    return ValidationRun(report, files, tuple(cohort))
