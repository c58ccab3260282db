"""The one-page technician report: one HTML layout, printed to PDF by Qt.

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

from appliance.results.schema import CaseResult
from runtime.files import atomic_path

DEMO_WARNING = "DEMO MODEL, NOT FOR DIAGNOSIS"
CALL_COLOURS = {"positive": "#b00020", "negative": "#1b5e20", "indeterminate": "#8a6d00"}
# Printing takes well under a second; this bounds a printer that hangs.
PRINT_TIMEOUT_SECONDS = 60.0
log = logging.getLogger(__name__)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def render_report_html(result: CaseResult) -> str:
    """Everything a technician needs on one page, from the case's result."""
    parts = [
        "<html><head><meta charset='utf-8'>",
        f"<title>cytoedge - case {_e(result.case_id)}</title></head>",
        "<body style='font-family: sans-serif; font-size: 10pt;'>",
    ]
    if result.is_demo:
        parts.append(
            "<table width='100%' cellpadding='8' style='background-color:#b00020;'>"
            "<tr><td style='color:white; font-size:16pt; font-weight:bold;' align='center'>"
            f"{DEMO_WARNING}</td></tr>"
            "<tr><td style='color:white;' align='center'>This result comes from a demonstration"
            " model trained on synthetic images. It says nothing about a patient.</td></tr>"
            "</table>"
        )
    parts.append(
        f"<h2>Case {_e(result.case_id)} &nbsp; <small>result version "
        f"{_e(result.version)}</small></h2>"
    )
    parts.append(_status_block(result))
    parts.append(_heads_block(result))
    parts.append(_scans_block(result))
    parts.append(_pictures_block(result))
    parts.append(_footer(result))
    parts.append("</body></html>")
    return "\n".join(parts)


def _status_block(result: CaseResult) -> str:
    if result.status == "scored":
        colour, text = "#1b5e20", "Scored"
    elif result.status == "abstained":
        colour, text = "#8a6d00", f"No call (abstained): {_e(result.abstain_reason)}"
    else:
        colour, text = "#b00020", f"Rejected: {_e(result.abstain_reason)}"
    lines = [
        f"<p style='font-size:13pt; font-weight:bold; color:{colour};'>{text}</p>",
        f"<p>{result.cells} cells from {len(result.scans)} scan(s) scored together.",
    ]
    if result.attention_top20_mass is not None:
        lines.append(
            f" The top 20 % of cells hold {_pct(result.attention_top20_mass)} of the attention."
        )
    lines.append("</p>")
    return "".join(lines)


def _call_cell(call: str) -> str:
    return f"<td style='color:{CALL_COLOURS.get(call, 'black')}; font-weight:bold;'>{_e(call)}</td>"


def _heads_block(result: CaseResult) -> str:
    """Each head's rows as its kind made them: calls with thresholds, then findings."""
    rows: list[str] = []
    for head in result.heads:
        if not head.predictions and not head.findings:
            continue
        rows.append(f"<h3>{_e(head.name)}</h3>")
        rows.append("<table border='1' cellspacing='0' cellpadding='4'>")
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
    return "".join(rows)


def _scans_block(result: CaseResult) -> str:
    rows = [
        "<h3>Scans and quality control</h3>",
        "<table border='1' cellspacing='0' cellpadding='4'>",
        "<tr><th align='left'>scan</th><th>format</th><th>um/px</th><th>QC</th>"
        "<th align='left'>reasons</th><th>cells</th></tr>",
    ]
    for scan in result.scans:
        colour = "#1b5e20" if scan.qc.verdict == "pass" else "#b00020"
        pixel = "-" if scan.pixel_size_um is None else f"{scan.pixel_size_um:.3f}"
        rows.append(
            f"<tr><td>{_e(scan.name)}</td><td>{_e(scan.format)}</td>"
            f"<td align='right'>{pixel}</td>"
            f"<td style='color:{colour}; font-weight:bold;'>{_e(scan.qc.verdict)}</td>"
            f"<td>{_e('; '.join(scan.qc.reasons))}</td>"
            f"<td align='right'>{scan.cells}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _pictures_block(result: CaseResult) -> str:
    # Gallery and heatmaps side by side so that the report stays on one A4 page.
    gallery = ""
    if result.outputs.gallery:
        gallery = (
            "<b>The 20 cells with the highest attention</b><br>"
            f"<img src='{_e(result.outputs.gallery)}' width='400'>"
        )
    heatmaps = [(scan.slide_id, scan.outputs.heatmap) for scan in result.scans if scan.outputs]
    maps = ""
    if heatmaps:
        maps = "<b>Attention over each slide</b><br>(blue low, red high)<br>"
        width = {1: 230, 2: 150}.get(len(heatmaps), 100)
        for slide, path in heatmaps:
            maps += f"<img src='{_e(path)}' width='{width}'><br><small>{_e(slide)}</small><br>"
    if not gallery and not maps:
        return ""
    return (
        "<table cellpadding='4'><tr>"
        f"<td valign='top'>{gallery}</td><td valign='top'>{maps}</td></tr></table>"
    )


def _footer(result: CaseResult) -> str:
    bundle = result.bundle
    timing_text = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings_s.items())
    return (
        "<hr><p style='font-size:8pt; color:#555;'>"
        f"Model bundle {_e(bundle.name)} {_e(bundle.version)} "
        f"(intended use: {_e(bundle.intended_use)}, sha256 "
        f"{_e(bundle.sha256[:16])}); backend {_e(result.backend)}; "
        f"created {_e(result.created)}.<br>Timings: {_e(timing_text)}</p>"
    )


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
