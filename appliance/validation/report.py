"""The validation report folder: report.json (the figures), report.html with its
pictures, and report.pdf printed from the same HTML as the case report is
(``appliance.results.report.write_report_pdf``: Qt in a child process).

Pictures: ``roc-<n>.png`` and ``reliability-<n>.png`` for the n-th task of
``tasks`` (1-based), ``classes-<n>.png`` for the n-th entry of ``classes``; with a cell
head's figures, ``cell-confusion.png`` and ``cell-coverage.png`` (``cell_section``).
A report of labelled cells alone has no cases table.

The report names its cases table by file name and sha256 and keeps a copy of the
bytes read as ``cases-table.csv``: the folder the table was read from may be gone
(a build's temporary folder) by the time anyone reads the report.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from appliance.results.report import DEMO_WARNING, write_report_pdf
from appliance.validation.cases_table import CasesTable
from appliance.validation.cell_section import cell_section_html, write_cell_pictures
from appliance.validation.measures import (
    ClassFigures,
    Proportion,
    TaskFigures,
    ValidationReport,
)
from appliance.validation.pictures import reliability_picture, roc_picture
from runtime.files import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic
from runtime.typed_json import dump, finite

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_PDF = "report.pdf"
TABLE_COPY = "cases-table.csv"
TITLES = {"validation": "Validation report", "out-of-fold": "Training report (out-of-fold)"}
PICTURE_WIDTH = 300


@dataclass(frozen=True)
class ReportFiles:
    folder: Path
    json: Path
    html: Path
    pdf: Path | None


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _figure(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def _proportion(p: Proportion) -> str:
    return f"{_interval(p.value, p.low, p.high)}<br><small>{p.successes}/{p.total}</small>"


def write_validation_report(
    folder: Path, report: ValidationReport, table: CasesTable | None, *, pdf: bool = True
) -> ReportFiles:
    """Write every file of the report on ``table``'s cases (None: labelled cells alone)
    into ``folder`` (created), with the table's copy; each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    if table is not None:
        write_bytes_atomic(folder / TABLE_COPY, table.data)
    for n, task in enumerate(report.tasks, start=1):
        title = f"{task.head}: {task.label}"
        operating = None
        if task.sensitivity.value is not None and task.specificity.value is not None:
            operating = (1 - task.specificity.value, task.sensitivity.value)
        _save(roc_picture(f"ROC {title}", task.roc, operating), folder / f"roc-{n}.png")
        _save(
            reliability_picture(f"Reliability {title}", task.reliability),
            folder / f"reliability-{n}.png",
        )
    for n, figures in enumerate(report.classes, start=1):
        _save(
            reliability_picture(f"Reliability {figures.head}: top class", figures.reliability),
            folder / f"classes-{n}.png",
        )
    if report.cells is not None:
        write_cell_pictures(folder, report.cells)
    json_path = folder / REPORT_JSON
    write_json_atomic(json_path, finite(dump(report)))
    page = render_report_html(report)
    html_path = folder / REPORT_HTML
    write_text_atomic(html_path, page)
    pdf_path = folder / REPORT_PDF
    printed = pdf and write_report_pdf(page, folder, pdf_path)
    return ReportFiles(folder, json_path, html_path, pdf_path if printed else None)


def _save(image: object, target: Path) -> None:
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")  # type: ignore[attr-defined]


def render_report_html(report: ValidationReport) -> str:
    """The whole report on pages of one layout (the subset of HTML Qt prints)."""
    parts = [
        "<html><head><meta charset='utf-8'>",
        f"<title>cytoedge - {_e(TITLES[report.kind])}</title></head>",
        "<body style='font-family: sans-serif; font-size: 10pt;'>",
    ]
    if report.intended_use == "demo":
        # The demo's cohorts are synthetic; labelled cells may be anyone's.
        cohort = ": synthetic cases, synthetic labels" if report.cases_table is not None else ""
        parts.append(
            "<p style='color:white; background-color:#b00020; font-weight:bold;' "
            f"align='center'>{DEMO_WARNING}{cohort}</p>"
        )
    parts.append(f"<h2>{_e(TITLES[report.kind])}</h2>")
    parts.append(_header(report))
    if report.recipes:
        parts.append(_recipes_block(report))
    if report.tasks:
        parts.append(_tasks_table(report.tasks))
    for figures in report.classes:
        parts.append(_classes_block(figures))
    if report.values:
        parts.append(_values_block(report))
    for n, task in enumerate(report.tasks, start=1):
        parts.append(
            f"<h3>{_e(task.head)}: {_e(task.label)}</h3>"
            f"<p>AUC {_interval(task.auc, task.auc_low, task.auc_high)}; "
            f"expected calibration error {_figure(task.ece)}; the red dot is the bundle's "
            f"threshold {task.threshold:.3f}.</p>"
            "<table><tr>"
            f"<td><img src='roc-{n}.png' width='{PICTURE_WIDTH}'></td>"
            f"<td><img src='reliability-{n}.png' width='{PICTURE_WIDTH}'></td>"
            "</tr></table>"
        )
    for n, figures in enumerate(report.classes, start=1):
        parts.append(
            f"<h3>{_e(figures.head)}: calibration of the top class</h3>"
            f"<p>Expected calibration error {_figure(figures.ece)}.</p>"
            f"<img src='classes-{n}.png' width='{PICTURE_WIDTH}'>"
        )
    if report.cases_table is not None:
        parts.append(_not_scored_block(report))
    if report.cells is not None:
        parts.append(cell_section_html(report.cells, report.kind))
    notes = (
        [
            f"AUC intervals: {report.bootstrap_resamples} bootstrap resamples of the cases "
            f"(seed {report.seed}), percentile 95 %; proportions: Wilson 95 % intervals. "
            "Sensitivity, specificity, PPV and NPV count positive and negative calls only; "
            "indeterminate calls and cases without a call are counted apart."
        ]
        if report.cases_table is not None
        else []
    )
    if report.cells is not None:
        notes.append(
            "Cells: F1 is the harmonic mean of precision and recall; weighted F1 weighs "
            "each class by its labelled cells, macro F1 counts each class with cells once."
        )
    parts.append(
        "<hr><p style='font-size:8pt; color:#555;'>"
        f"{' '.join(notes)} Created {_e(report.created)}.</p></body></html>"
    )
    return "\n".join(parts)


def _header(report: ValidationReport) -> str:
    rows = [
        f"<tr><td><b>Bundle</b></td><td>{_e(report.bundle_name)} {_e(report.bundle_version)} "
        f"({_e(report.intended_use)}), sha256 {_e(report.bundle_sha256[:16])}</td></tr>"
    ]
    what = ""
    if report.cases_table is not None:
        rows.append(
            f"<tr><td><b>Cases</b></td><td>{report.cases} from {_e(report.cases_table)} "
            f"(sha256 {_e((report.cases_table_sha256 or '')[:16])}; a copy is {TABLE_COPY} "
            "beside this report)</td></tr>"
        )
        what = (
            "<p>Each case was scored by the bundle exactly as the service scores it.</p>"
            if report.kind == "validation"
            else "<p>Each case was predicted by the fold model that did not see it; the "
            "bundle ships the fold models as its ensemble.</p>"
        )
    if report.cells is not None:
        rows.append(
            f"<tr><td><b>Cells</b></td><td>{report.cells.figures.cells} labelled cells from "
            f"{_e(report.cells.source)}</td></tr>"
        )
    return f"<table cellpadding='2'>{''.join(rows)}</table>{what}"


def _tasks_table(tasks: tuple[TaskFigures, ...]) -> str:
    rows = [
        "<table border='1' cellspacing='0' cellpadding='3'>",
        "<tr><th align='left'>task</th><th>cases (positive)</th><th>AUC (95 % CI)</th>"
        "<th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th>"
        "<th>indeterminate</th><th>no call</th><th>ECE</th></tr>",
    ]
    for t in tasks:
        rows.append(
            f"<tr><td>{_e(t.head)}: {_e(t.label)}</td>"
            f"<td align='right'>{t.labelled} ({t.positives})</td>"
            f"<td>{_interval(t.auc, t.auc_low, t.auc_high)}</td>"
            f"<td align='right'>{t.threshold:.3f} &plusmn; {t.band:.2f}</td>"
            f"<td>{_proportion(t.sensitivity)}</td><td>{_proportion(t.specificity)}</td>"
            f"<td>{_proportion(t.ppv)}</td><td>{_proportion(t.npv)}</td>"
            f"<td align='right'>{t.indeterminate}</td><td align='right'>{t.not_scored}</td>"
            f"<td align='right'>{_figure(t.ece)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _recipes_block(report: ValidationReport) -> str:
    """Each marker's out-of-fold AUC by recipe, side by side: the same cases and folds."""
    heads = list(report.recipes)
    auc = {(t.head, t.task): t for t in report.tasks if t.head in report.recipes}
    tasks = [t for t in report.tasks if t.head == heads[0]]
    header = "".join(
        f"<th>{_e(report.recipes[h])}{' (written)' if i == 0 else ''}</th>"
        for i, h in enumerate(heads)
    )
    rows = [
        "<h3>Recipes on the same folds</h3>",
        "<p>Out-of-fold AUC (95 % CI) of each way of learning the markers, each trained "
        "and tested on the same cases in the same folds; the first is the one this "
        "version ships. Their other figures are in the table below, by head.</p>",
        "<table border='1' cellspacing='0' cellpadding='3'>",
        f"<tr><th align='left'>task</th>{header}</tr>",
    ]
    for task in tasks:
        cells = []
        for head in heads:
            t = auc.get((head, task.task))
            cells.append(f"<td>{_interval(t.auc, t.auc_low, t.auc_high) if t else '-'}</td>")
        rows.append(f"<tr><td>{_e(task.label)}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _classes_block(figures: ClassFigures) -> str:
    largest = max((max(row) for row in figures.confusion), default=1) or 1
    rows = [
        f"<h3>{_e(figures.head)}: {len(figures.classes)} classes</h3>",
        f"<p>{figures.scored} of {figures.labelled} labelled cases scored. Top-1 accuracy "
        f"{_figure(figures.top1)}, top-2 accuracy {_figure(figures.top2)}, macro recall "
        f"{_figure(figures.macro_recall)}.</p>",
        "<table border='1' cellspacing='0' cellpadding='3'>",
        "<tr><th align='left'>true \\ predicted</th>"
        + "".join(f"<th><small>{_e(c)}</small></th>" for c in figures.classes)
        + "<th>recall</th></tr>",
    ]
    for name, row in zip(figures.classes, figures.confusion, strict=True):
        cells = []
        for column, count in enumerate(row):
            shade = 255 - int(150 * count / largest)
            diagonal = figures.classes[column] == name
            colour = f"rgb({shade},{255 if diagonal else shade},{shade})"
            cells.append(f"<td align='right' style='background-color:{colour};'>{count}</td>")
        rows.append(
            f"<tr><td><small>{_e(name)}</small></td>{''.join(cells)}"
            f"<td align='right'>{_figure(figures.recall.get(name))}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _values_block(report: ValidationReport) -> str:
    rows = ["<h3>Values</h3><table border='1' cellspacing='0' cellpadding='3'>"]
    rows.append("<tr><th align='left'>value</th><th>cases</th><th>mean absolute error</th></tr>")
    for v in report.values:
        rows.append(
            f"<tr><td>{_e(v.head)}: {_e(v.label)}</td><td align='right'>{v.scored} of "
            f"{v.labelled}</td><td align='right'>{_figure(v.mean_absolute_error, 2)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _not_scored_block(report: ValidationReport) -> str:
    lost = "".join(
        f"<li>{_e(line.case_id)}: scored without {_e('; '.join(line.rejected_scans))}</li>"
        for line in report.lost_scans
    )
    lost = f"<p>Scans the reader rejected in scored cases:</p><ul>{lost}</ul>" if lost else ""
    if not report.not_scored:
        return "<p>Every case was scored.</p>" + lost
    rows = [
        f"<h3>Cases without a call ({len(report.not_scored)})</h3>",
        "<table border='1' cellspacing='0' cellpadding='3'>",
        "<tr><th align='left'>case</th><th>status</th><th align='left'>why</th></tr>",
    ]
    for line in report.not_scored:
        rows.append(
            f"<tr><td>{_e(line.case_id)}</td><td>{_e(line.status)}</td>"
            f"<td>{_e(line.reason)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows) + lost
