"""``cytoedge validate BUNDLE CELLS``'s work: labelled cells embedded by the bundle's
encoder, classified by its cell head (calibrated, at its operating point) as the
service classifies a kept cell, the figures against the labels, the report.

The cells are read by ``labelled_cells.read_labelled_cells`` (class folders, a points
table, or QuPath annotations) through the bundle's own cell path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from appliance.pipeline.networks import SlideNetworks
from appliance.results import BundleRecord
from appliance.validation.cell_measures import cell_figures
from appliance.validation.cohort import PipelineSettings
from appliance.validation.labelled_cells import read_labelled_cells
from appliance.validation.measures import (
    CellReport,
    ValidationReport,
    build_report,
    cell_report,
)
from appliance.validation.report import ReportFiles, write_validation_report
from runtime.bundle_format import Bundle, HeadSpec
from runtime.head_kinds.cell_classifier import CONFIDENCE, CellClassifierParams


class CellValidationError(ValueError):
    """Labelled cells that cannot validate this bundle; one line."""


@dataclass(frozen=True)
class CellValidationRun:
    report: ValidationReport
    cells: CellReport  # the report's cell part
    files: ReportFiles
    truth: tuple[str, ...]  # each cell's label
    probabilities: np.ndarray  # (N, C) calibrated, in the cell head's class order


def cell_head_of(bundle: Bundle) -> HeadSpec:
    """The bundle's cell head, or CellValidationError saying there is none."""
    if bundle.cell_head is None:
        raise CellValidationError(
            f"bundle {bundle.name} {bundle.version} has no cell head: labelled cells "
            "validate a cell head (docs/cells.md)"
        )
    return bundle.cell_head


def validate_cells(
    bundle: Bundle,
    path: Path,
    pipeline: PipelineSettings,
    console: Console,
    *,
    folder: Path,
    pdf: bool = True,
) -> CellValidationRun:
    """Read and embed the labelled cells at ``path`` (their labels must be classes of the
    cell head: ``LabelledCellsError`` names the first that is not), classify them with
    the bundle's cell head as a slide's kept cells are, and write the report into
    ``folder``."""
    spec = cell_head_of(bundle)
    params: CellClassifierParams = spec.params
    with SlideNetworks(bundle, pipeline.runtime) as networks:
        labelled = read_labelled_cells(path, params.taxonomy, networks, pipeline, console)
        probabilities = networks.classify(labelled.embeddings)
    calibrated = spec.head_kind.calibrate(spec, probabilities)
    figures = cell_figures(
        params.taxonomy,
        labelled.labels,
        calibrated,
        target_accuracy=params.target_accuracy,
        confidence_needed=spec.thresholds[CONFIDENCE],
    )
    cells = cell_report(spec, figures, path.name)
    report = build_report(
        (),
        BundleRecord(bundle.name, bundle.version, bundle.sha256, bundle.intended_use),
        (),
        kind="validation",
        table=None,
        cells=cells,
    )
    files = write_validation_report(folder, report, None, pdf=pdf)
    return CellValidationRun(report, cells, files, labelled.labels, calibrated)
