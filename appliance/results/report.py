"""The one-page report: one HTML layout, printed to an A4 PDF by Qt.

The HTML uses only the subset Qt's rich-text engine renders (tables, inline
styles, images), so ``report.pdf`` is the same content as ``report.html``
without a second layout to keep in step. PySide6 is optional: without it the
PDF is skipped with a logged note.

Qt prints in a short-lived child process (``python -m appliance.results.print_pdf``,
about half a second per report): Qt objects made on the service's worker
thread cannot be destroyed safely at interpreter exit, and a printer that
hangs is killed after a timeout instead of holding the job.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from appliance.results.print_pdf import BODY_PX
from appliance.results.schema import DECISION_WORDS, BundleRecord, CaseResult
from runtime.files import atomic_path

DEMO_WARNING = "DEMO MODEL, NOT FOR DIAGNOSIS"
CALL_COLOURS = {"positive": "#b00020", "negative": "#1b5e20", "indeterminate": "#8a6d00"}
BODY_WIDTH = BODY_PX[0]  # the page's width for the layout, in CSS pixels
GALLERY_COLUMNS = 7  # 20 cells in three rows
GALLERY_CELL_PX = 84  # 22 mm on paper: a nucleus's chromatin is readable
GALLERY_MAX_HEIGHT = 380.0  # the gallery picture, when the crops are missing
# A differential's classes side by side in up to three columns: marrow-mll's 21 classes
# take seven rows, a short taxonomy one column.
DIFFERENTIAL_ROWS = 7
WARNING_STYLE = "background-color:#fff3cd; color:#5c3c00;"
BELOW_COLOUR = "#b00020"
HEATMAP_MAX_PX = 220.0  # 58 mm: three slides side by side, a tall one no taller
# Printing takes well under a second; this bounds a printer that hangs.
PRINT_TIMEOUT_SECONDS = 60.0
log = logging.getLogger(__name__)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def render_report_html(result: CaseResult, folder: Path | None = None) -> str:
    """Everything a technician and a pathologist need, on one A4 page.

    Top to bottom: the demo warning, the case line with its sign-off and warnings,
    the calls beside the scans' QC, the cell head's differential with the
    plasma-cell burden, the cells that weighed most (their own crops, large enough
    to read), the attention over each slide, the provenance. ``folder`` is
    the version folder the pictures are in: their sizes bound each picture's box
    so that a tall slide cannot push the page over; without it widths alone are set.
    """
    parts = [
        "<html><head><meta charset='utf-8'>",
        f"<title>cytoedge - case {_e(result.case_id)}</title></head>",
        "<body style='font-family: sans-serif; font-size: 9.5pt;'>",
    ]
    if result.is_demo:
        parts.append(
            "<table width='100%' cellpadding='4' style='background-color:#b00020;'>"
            "<tr><td style='color:white; font-size:13pt; font-weight:bold;' align='center'>"
            f"{DEMO_WARNING}</td></tr>"
            "<tr><td style='color:white; font-size:8.5pt;' align='center'>This result comes"
            " from a demonstration model trained on synthetic images. It says nothing about a"
            " patient.</td></tr></table>"
        )
    if result.bundle.signature_warning:
        parts.append(
            "<table width='100%' cellpadding='3' style='background-color:#8a6d00;'>"
            "<tr><td style='color:white; font-size:10pt; font-weight:bold;' align='center'>"
            f"{_e(result.bundle.signature_warning.upper())}</td></tr></table>"
        )
    parts.append(_case_block(result))
    parts.append(
        "<table width='100%' cellspacing='0' cellpadding='0'><tr>"
        f"<td width='52%' valign='top'>{_heads_block(result)}</td>"
        "<td width='2%'></td>"
        f"<td width='46%' valign='top'>{_scans_block(result)}</td></tr></table>"
    )
    parts.append(_differential_block(result))
    parts.append(_similar_block(result))
    parts.append(_gallery_block(result, folder))
    parts.append(_heatmaps_block(result, folder))
    parts.append(_footer(result))
    parts.append("</body></html>")
    return "\n".join(parts)


def _status_text(result: CaseResult) -> tuple[str, str]:
    if result.status == "scored":
        return "#1b5e20", "Scored"
    if result.status == "abstained":
        return "#8a6d00", f"No call (abstained): {_e(result.abstain_reason)}"
    return "#b00020", f"Rejected: {_e(result.abstain_reason)}"


def _case_block(result: CaseResult) -> str:
    """The case, its status and its sign-off: what is read first."""
    colour, status = _status_text(result)
    cells = f"{result.cells} cells from {len(result.scans)} scan(s) scored together."
    if result.attention_top20_mass is not None:
        cells += (
            f" The top 20 % of cells hold {_pct(result.attention_top20_mass)} of the attention."
        )
    warnings = "".join(
        f"<table width='100%' cellpadding='3' style='{WARNING_STYLE}'><tr><td>"
        f"<b>Warning:</b> {_e(warning)}</td></tr></table>"
        for warning in result.warnings
    )
    return (
        "<table width='100%' cellspacing='0' cellpadding='3'><tr>"
        f"<td valign='top'><span style='font-size:15pt; font-weight:bold;'>"
        f"Case {_e(result.case_id)}</span> &nbsp; result version {_e(result.version)}<br>"
        f"<span style='font-size:12pt; font-weight:bold; color:{colour};'>{status}</span><br>"
        f"{cells}{warnings}</td>"
        f"<td width='42%' valign='top'>{_review_block(result)}</td></tr></table>"
    )


def _review_block(result: CaseResult) -> str:
    review = result.review
    if review is None:
        return (
            "<table width='100%' cellpadding='5' style='background-color:#eeeeee;'><tr><td>"
            "<b>Review:</b> not signed off</td></tr></table>"
        )
    colour = {"accepted": "#1b5e20", "rejected": "#b00020"}.get(review.decision, "#0d47a1")
    lines = [
        f"<b>Review: <span style='color:{colour};'>{_e(DECISION_WORDS[review.decision])}</span>"
        f"</b> by {_e(review.reviewer)}, {_e(review.signed_at)} (version "
        f"{review.reviewed_version} reviewed)",
    ]
    if review.reason:
        lines.append(f"Reason: {_e(review.reason)}")
    if review.confirmed is not None:
        lines.append("<b>Confirmed:</b>")
        lines += [f"{what}: {_e(text)}" for what, text in review.confirmed.lines()]
    if review.waited_for:
        lines.append(f"Waited for review: {_e('; '.join(review.waited_for))}")
    return (
        "<table width='100%' cellpadding='5' style='background-color:#e8eef6;'><tr><td>"
        + "<br>".join(lines)
        + "</td></tr></table>"
    )


def _heading(text: str, note: str = "") -> str:
    # Qt's h3 margins would cost a tenth of the page over the report's four headings.
    small = f" <span style='font-size:8pt; font-weight:normal;'>({_e(note)})</span>" if note else ""
    return (
        "<p style='font-size:11pt; font-weight:bold; margin-top:8px; margin-bottom:3px;'>"
        f"{_e(text)}{small}</p>"
    )


def _call_cell(call: str) -> str:
    return f"<td style='color:{CALL_COLOURS.get(call, 'black')}; font-weight:bold;'>{_e(call)}</td>"


def _heads_block(result: CaseResult) -> str:
    """Each head's rows as its kind made them: calls with thresholds, then findings."""
    rows: list[str] = [_heading("Calls")]
    for head in result.heads:
        if not head.predictions and not head.findings:
            continue
        rows.append(
            "<table width='100%' border='1' cellspacing='0' cellpadding='3'>"
            f"<tr><th colspan='4' align='left'>{_e(head.name)}</th></tr>"
        )
        if head.predictions:
            rows.append(
                "<tr><th align='left'>task</th><th>probability</th><th>threshold</th>"
                "<th>call</th></tr>"
            )
        for p in head.predictions:
            rows.append(
                f"<tr><td>{_e(p.label)}</td><td align='right'>{p.probability:.3f}</td>"
                f"<td align='right'>{p.threshold:.3f}</td>{_call_cell(p.call)}</tr>"
            )
        for finding in head.findings:
            value = _call_cell(finding.call) if finding.call else f"<td>{_e(finding.text)}</td>"
            rows.append(f"<tr><td colspan='3'><b>{_e(finding.label)}</b></td>{value}</tr>")
        rows.append("</table>")
    if len(rows) == 1:
        rows.append(f"<p>No call was made: {_e(result.abstain_reason or 'no predictions')}.</p>")
    return "".join(rows)


def _scans_block(result: CaseResult) -> str:
    rows = [
        _heading("Scans and quality control"),
        "<table width='100%' border='1' cellspacing='0' cellpadding='3'>",
        "<tr><th align='left'>scan</th><th>um/px</th><th>QC</th>"
        "<th align='left'>reasons, share examined</th><th>cells</th></tr>",
    ]
    for scan in result.scans:
        colour = {"pass": "#1b5e20", "warn": "#8a6d00"}.get(scan.qc.verdict, "#b00020")
        pixel = "-" if scan.pixel_size_um is None else f"{scan.pixel_size_um:.3f}"
        notes = _e("; ".join(scan.qc.reasons))
        for sentence in (
            scan.examined.sentence() if scan.examined else None,
            scan.set_aside_sentence(),
        ):
            if sentence:
                notes += f"{'<br>' if notes else ''}<small>{_e(sentence)}</small>"
        rows.append(
            f"<tr><td>{_e(scan.name)}<br><small>{_e(scan.format)}</small></td>"
            f"<td align='right'>{pixel}</td>"
            f"<td style='color:{colour}; font-weight:bold;'>{_e(scan.qc.verdict)}</td>"
            f"<td>{notes}</td>"
            f"<td align='right'>{scan.cells}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _differential_block(result: CaseResult) -> str:
    """The cell head's differential: each class with its colour, count and percent of the
    classified cells with the Wilson 95 % interval; the unsure cells and the operating
    point; the plasma-cell burden against the minimum the model was validated on."""
    found = result.differential
    if found is None:
        return ""
    summary = (
        f"{found.classified} of {found.cells} cells classified, <b>{found.unsure} unsure</b>: "
        f"below the operating point (confidence {found.operating_point:.2f}, for "
        f"{100 * found.target_accuracy:.0f} % accuracy), for a person to look at"
    )
    header = (
        "<tr><th></th><th align='left'>class</th><th align='right'>cells</th>"
        "<th align='left'>% (95 % CI)</th></tr>"
    )
    rows = []
    for row in found.classes:
        red, green, blue = row.colour
        share = f"{row.percent:.1f} ({row.low:.1f}-{row.high:.1f})" if found.classified else "-"
        rows.append(
            f"<tr><td bgcolor='#{red:02x}{green:02x}{blue:02x}' width='9'>&nbsp;</td>"
            f"<td>{_e(row.label)}</td><td align='right'>{row.count}</td><td>&nbsp;{share}</td></tr>"
        )
    columns = max(1, -(-len(rows) // DIFFERENTIAL_ROWS))
    per_column = max(1, -(-len(rows) // columns))  # balanced: 21 classes, 7 a column
    tables = [
        "<table cellspacing='0' cellpadding='2' style='font-size:8pt;'>"
        + header
        + "".join(rows[i : i + per_column])
        + "</table>"
        for i in range(0, len(rows), per_column)
    ]
    width = 100 // max(1, len(tables))
    grid = "".join(f"<td width='{width}%' valign='top'>{table}</td>" for table in tables)
    burden = ""
    if result.burden is not None:
        colour = BELOW_COLOUR if result.burden.below else "black"
        burden = (
            f"<p style='margin-top:2px; margin-bottom:0px; color:{colour};'>"
            f"<b>{_e(result.burden.sentence())}</b></p>"
        )
    return (
        _heading("Differential", f"{found.taxonomy}; percent of the classified cells")
        + f"<p style='margin-top:0px; margin-bottom:2px;'>{summary}</p>"
        + f"<table width='100%' cellspacing='0' cellpadding='0'><tr>{grid}</tr></table>"
        + burden
    )


def _similar_block(result: CaseResult) -> str:
    """The signed-off cases whose patient embedding was nearest when this case was scored,
    with what was decided and confirmed for them: a short table (none without any)."""
    if not result.similar_cases:
        return ""
    rows = [
        _heading("Similar earlier cases", "signed off, nearest by patient embedding"),
        "<table width='100%' border='1' cellspacing='0' cellpadding='2'>",
        "<tr><th align='left'>case</th><th>similarity</th><th align='left'>decision</th>"
        "<th align='left'>confirmed</th></tr>",
    ]
    for similar in result.similar_cases:
        decision = DECISION_WORDS.get(similar.decision, similar.decision)
        rows.append(
            f"<tr><td>{_e(similar.case_id)}</td><td align='right'>{similar.similarity:.2f}</td>"
            f"<td>{_e(decision)}</td><td>{_e(similar.confirmed() or '-')}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _picture_box(folder: Path | None, path: str, width: float, height: float) -> str:
    """``width`` and ``height`` attributes that fit the picture in the box, aspect kept."""
    if folder is not None:
        try:
            with Image.open(folder / path) as image:
                w, h = image.size
        except OSError:
            w = h = 0
        if w > 0 and h > 0:
            scale = min(width / w, height / h)
            return f"width='{int(w * scale)}' height='{int(h * scale)}'"
    return f"width='{int(width)}'"


def _gallery_block(result: CaseResult, folder: Path | None) -> str:
    """The top cells, each its own crop with rank and attention, GALLERY_COLUMNS a row."""
    if not result.top_cells:
        return ""
    title = _heading("The 20 cells with the highest attention")
    crops = [c for c in result.top_cells if folder is None or (folder / c.image).is_file()]
    if len(crops) < len(result.top_cells) and result.outputs.gallery:
        box = _picture_box(folder, result.outputs.gallery, BODY_WIDTH, GALLERY_MAX_HEIGHT)
        return f"{title}<p align='center'><img src='{_e(result.outputs.gallery)}' {box}></p>"
    cells = []
    for cell in crops:
        cells.append(
            f"<td align='center'><img src='{_e(cell.image)}' width='{GALLERY_CELL_PX}' "
            f"height='{GALLERY_CELL_PX}'><br><small>#{cell.rank} · "
            f"{100 * cell.attention:.1f} %</small></td>"
        )
    rows = [
        "<tr>" + "".join(cells[i : i + GALLERY_COLUMNS]) + "</tr>"
        for i in range(0, len(cells), GALLERY_COLUMNS)
    ]
    return f"{title}<table cellspacing='4' cellpadding='0'>{''.join(rows)}</table>"


def _heatmaps_block(result: CaseResult, folder: Path | None) -> str:
    """One row: each slide's attention over its picture, as wide as the row allows."""
    heatmaps = [(scan.name, scan.outputs.heatmap) for scan in result.scans if scan.outputs]
    if not heatmaps:
        return ""
    width = min(HEATMAP_MAX_PX, (BODY_WIDTH - 10 * len(heatmaps)) / len(heatmaps))
    cells = "".join(
        f"<td align='center' valign='top'><img src='{_e(path)}' "
        f"{_picture_box(folder, path, width, HEATMAP_MAX_PX)}><br><small>{_e(name)}</small></td>"
        for name, path in heatmaps
    )
    return (
        _heading("Attention over each slide", "blue low, red high")
        + f"<table cellspacing='4' cellpadding='0'><tr>{cells}</tr></table>"
    )


def _footer(result: CaseResult) -> str:
    bundle = result.bundle
    timing_text = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings_s.items())
    return (
        "<hr><p style='font-size:7.5pt; color:#555;'>"
        f"Model bundle {_e(bundle.name)} {_e(bundle.version)} "
        f"(intended use: {_e(bundle.intended_use)}, sha256 "
        f"{_e(bundle.sha256[:16])}{_e(_signed(bundle))}); backend {_e(result.backend)}; "
        f"created {_e(result.created)}.<br>Timings: {_e(timing_text)}</p>"
    )


def _signed(bundle: BundleRecord) -> str:
    words = bundle.signed_words
    return f"; {words}" if words else ""


class ReportPrintError(RuntimeError):
    """The PDF printer failed; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def write_report_pdf(
    report_html: str, base_dir: Path, target: Path, *, timeout: float = PRINT_TIMEOUT_SECONDS
) -> bool:
    """Print the report HTML to ``target``; False (and a log line saying why) when no PDF."""
    if importlib.util.find_spec("PySide6") is None:
        log.warning("report.pdf skipped: PySide6 is not installed")
        return False
    try:
        with atomic_path(target) as tmp:
            print_pdf_in_child(report_html, base_dir, tmp, timeout=timeout)
        return True
    except ReportPrintError as exc:
        log.error("report.pdf not written: %s", exc.reason)
        return False


def print_pdf_in_child(
    report_html: str, base_dir: Path, target: Path, *, timeout: float = PRINT_TIMEOUT_SECONDS
) -> None:
    """Run ``python -m appliance.results.print_pdf`` on the HTML; ReportPrintError unless
    it wrote a PDF."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "appliance.results.print_pdf", str(base_dir), str(target)],
            input=report_html.encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ReportPrintError(f"the PDF printer did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise ReportPrintError(f"the PDF printer could not start: {exc}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = lines[-1] if lines else "no message"
        raise ReportPrintError(f"the PDF printer exited with {done.returncode}: {detail}")
    if not target.is_file() or target.stat().st_size == 0:
        raise ReportPrintError("the PDF printer wrote no PDF")
