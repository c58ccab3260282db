"""The cell head's section of the validation report: its pictures and its HTML.

``cytoedge validate`` on labelled cells and ``cytoedge train``'s out-of-fold cells
both fill it from a ``measures.CellReport``: per class precision, recall, F1 and
support; weighted and macro F1; the confusion matrix (``cell-confusion.png``); the
accuracy-coverage curve with the operating point (``cell-coverage.png``); the
critical errors by pair; and the coverage and accuracy at the operating point
against the target (METHOD.md C).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from appliance.validation.measures import CellReport, ReportKind
from appliance.validation.pictures import (
    CONFUSION_SCALE,
    confusion_picture,
    confusion_width,
    coverage_picture,
)
from runtime.files import atomic_path

CONFUSION_PICTURE = "cell-confusion.png"
COVERAGE_PICTURE = "cell-coverage.png"
COVERAGE_WIDTH = 300  # the curve's width on the page, as the ROC curves'
CALLED = {
    "validation": "Each labelled cell was embedded by the bundle's encoder and classified by "
    "its cell head, calibrated, as the service classifies a kept cell.",
    "out-of-fold": "Each labelled cell was classified by the fold model that did not see it; "
    "the bundle ships the fold models as its ensemble.",
}


def _e(value: object) -> str:
    return html.escape(str(value))


def _figure(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def write_cell_pictures(folder: Path, cells: CellReport) -> None:
    """The confusion matrix and the accuracy-coverage curve, each atomically."""
    figures = cells.figures
    names = [c.name for c in figures.classes]
    critical = {
        (names.index(pair.true), names.index(pair.called)) for pair in figures.critical_pairs
    }
    point = figures.operating_point
    pictures = {
        CONFUSION_PICTURE: confusion_picture(
            [c.label for c in figures.classes], figures.confusion, critical
        ),
        COVERAGE_PICTURE: coverage_picture(
            f"{cells.head}: accuracy against coverage",
            [(p.coverage, p.accuracy) for p in figures.curve],
            (point.coverage, point.accuracy) if point.coverage > 0 else None,
            figures.target_accuracy,
        ),
    }
    for name, image in pictures.items():
        with atomic_path(folder / name) as tmp:
            image.save(tmp, format="PNG")


def cell_section_html(cells: CellReport, kind: ReportKind) -> str:
    """The section; its pictures are ``write_cell_pictures``'s, sized to the page."""
    figures = cells.figures
    point = figures.operating_point
    sure = round(point.coverage * figures.cells)
    verdict = "reaches" if point.reached else "does not reach"
    labels = [c.label for c in figures.classes]
    width = round(confusion_width(labels) / CONFUSION_SCALE)
    temperature = (
        f", calibrated by temperature {cells.temperature:.3f}"
        if cells.temperature is not None
        else ""
    )
    parts = [
        f"<h3>Cell head {_e(cells.head)}: {figures.cells} labelled cells</h3>",
        f"<p>Cells from {_e(cells.source)}; taxonomy {_e(cells.taxonomy_title)} "
        f"({_e(figures.taxonomy)}, {len(figures.classes)} classes){temperature}. "
        f"{CALLED[kind]}</p>",
        "<table border='1' cellspacing='0' cellpadding='3'>",
        f"<tr><td>accuracy, every cell called</td><td align='right'>"
        f"{_figure(figures.accuracy)}</td></tr>",
        f"<tr><td>weighted F1</td><td align='right'>{_figure(figures.weighted_f1)}</td></tr>",
        f"<tr><td>macro F1</td><td align='right'>{_figure(figures.macro_f1)}</td></tr>",
        f"<tr><td>operating point</td><td align='right'>confidence &ge; "
        f"{_figure(point.confidence)}</td></tr>",
        f"<tr><td>coverage at the operating point</td><td align='right'>"
        f"{_figure(point.coverage)} ({sure} of {figures.cells} cells)</td></tr>",
        f"<tr><td>accuracy at the operating point</td><td align='right'>"
        f"{_figure(point.accuracy)} ({verdict} the target {_figure(figures.target_accuracy)})"
        "</td></tr>",
        f"<tr><td>critical errors</td><td align='right'>{figures.critical_errors} "
        f"({figures.critical_errors_sure} at or above the operating point)</td></tr>",
        "</table>",
        "<p>Below the operating point a cell is <i>unsure</i> and goes to a person.</p>",
        _classes_table(cells),
        "<p>The confusion matrix: the calls of every cell at its most probable class; "
        "framed in red, the confusions the taxonomy names dangerous.</p>",
        f"<p><img src='{CONFUSION_PICTURE}' width='{width}'></p>",
        f"<p>Accuracy of the cells called against their share, surest first; the red dot is "
        f"the operating point, the dashed line the target accuracy "
        f"{_figure(figures.target_accuracy)}.</p>",
        f"<p><img src='{COVERAGE_PICTURE}' width='{COVERAGE_WIDTH}'></p>",
        _critical_block(cells),
    ]
    return "".join(parts)


def _classes_table(cells: CellReport) -> str:
    rows = [
        "<table border='1' cellspacing='0' cellpadding='3'>",
        "<tr><th align='left'>class</th><th>cells</th><th>precision</th><th>recall</th>"
        "<th>F1</th></tr>",
    ]
    for c in cells.figures.classes:
        rows.append(
            f"<tr><td>{_e(c.label)}</td><td align='right'>{c.support}</td>"
            f"<td align='right'>{_figure(c.precision)}</td>"
            f"<td align='right'>{_figure(c.recall)}</td>"
            f"<td align='right'>{_figure(c.f1) if c.support else '-'}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _critical_block(cells: CellReport) -> str:
    figures = cells.figures
    if not figures.critical_pairs:
        named = "; ".join(_e(c.why) for c in cells.critical)
        return (
            f"<p>No critical error ({named}).</p>"
            if named
            else "<p>The taxonomy names no confusion dangerous.</p>"
        )
    labels = {c.name: c.label for c in figures.classes}
    rows = [
        f"<h4>Critical errors ({figures.critical_errors})</h4>",
        "<table border='1' cellspacing='0' cellpadding='3'>",
        "<tr><th align='left'>true class</th><th align='left'>called</th><th>cells</th>"
        "<th>sure</th><th align='left'>why it matters</th></tr>",
    ]
    for pair in figures.critical_pairs:
        why = next(
            (c.why for c in cells.critical if c.true == pair.true and pair.called in c.predicted),
            "",
        )
        rows.append(
            f"<tr><td>{_e(labels[pair.true])}</td><td>{_e(labels[pair.called])}</td>"
            f"<td align='right'>{pair.cells}</td><td align='right'>{pair.sure}</td>"
            f"<td>{_e(why)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)
