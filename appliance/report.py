"""The one-page technician report: one HTML layout, printed to PDF by Qt.

The HTML uses only the subset Qt's rich-text engine renders (tables, inline
styles, images), so ``report.pdf`` is the same content as ``report.html``
without a second layout to keep in step. PySide6 is optional: without it the
PDF is skipped with a logged note.

Qt prints in a short-lived child process (``python -m appliance.report``,
about half a second per report): Qt objects made on the service's worker
thread cannot be destroyed safely at interpreter exit, and a printer that
hangs is killed after a timeout instead of holding the job.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def render_report_html(result: dict[str, Any]) -> str:
    """Everything a technician needs on one page, from the result.json content."""
    bundle = result.get("bundle", {})
    parts = [
        "<html><head><meta charset='utf-8'>",
        f"<title>cytoedge - case {_e(result.get('case_id'))}</title></head>",
        "<body style='font-family: sans-serif; font-size: 10pt;'>",
    ]
    if bundle.get("intended_use") == "demo":
        parts.append(
            "<table width='100%' cellpadding='8' style='background-color:#b00020;'>"
            "<tr><td style='color:white; font-size:16pt; font-weight:bold;' align='center'>"
            f"{DEMO_WARNING}</td></tr>"
            "<tr><td style='color:white;' align='center'>This result comes from a demonstration"
            " model trained on synthetic images. It says nothing about a patient.</td></tr>"
            "</table>"
        )
    parts.append(
        f"<h2>Case {_e(result.get('case_id'))} &nbsp; <small>result version "
        f"{_e(result.get('version'))}</small></h2>"
    )
    parts.append(_status_block(result))
    parts.append(_predictions_block(result))
    parts.append(_scans_block(result))
    parts.append(_pictures_block(result))
    parts.append(_footer(result))
    parts.append("</body></html>")
    return "\n".join(parts)


def _status_block(result: dict[str, Any]) -> str:
    status = result.get("status", "")
    if status == "scored":
        colour, text = "#1b5e20", "Scored"
    elif status == "abstained":
        colour, text = "#8a6d00", f"No call (abstained): {_e(result.get('abstain_reason'))}"
    else:
        colour, text = "#b00020", f"Rejected: {_e(result.get('abstain_reason'))}"
    cells = sum(int(scan.get("cells", 0)) for scan in result.get("scans", []))
    mass = result.get("attention_top20_mass")
    lines = [
        f"<p style='font-size:13pt; font-weight:bold; color:{colour};'>{text}</p>",
        f"<p>{cells} cells from {len(result.get('scans', []))} scan(s) scored together.",
    ]
    if mass is not None:
        lines.append(f" The top 20 % of cells hold {_pct(mass)} of the attention.")
    lines.append("</p>")
    return "".join(lines)


def _predictions_block(result: dict[str, Any]) -> str:
    predictions = result.get("predictions") or []
    if not predictions:
        return ""
    rows = [
        "<h3>Predictions</h3>",
        "<table border='1' cellspacing='0' cellpadding='4'>",
        "<tr><th align='left'>task</th><th>probability</th><th>threshold</th><th>call</th></tr>",
    ]
    for p in predictions:
        call = p.get("call", "")
        colour = CALL_COLOURS.get(call, "black")
        rows.append(
            f"<tr><td>{_e(p.get('label') or p.get('task'))}</td>"
            f"<td align='right'>{p.get('probability', 0):.3f}</td>"
            f"<td align='right'>{p.get('threshold', 0):.3f}</td>"
            f"<td style='color:{colour}; font-weight:bold;'>{_e(call)}</td></tr>"
        )
    rows.append("</table>")
    high_risk = result.get("high_risk")
    if high_risk is not None:
        rows.append(f"<p><b>High risk (del(17p) and/or t(4;14)):</b> {_e(high_risk)}</p>")
    if result.get("malignancy_probability") is not None:
        top2 = ", ".join(
            f"{_e(c.get('class'))} {c.get('probability', 0):.2f}" for c in result.get("top2") or []
        )
        rows.append(
            f"<p><b>Malignancy probability:</b> {result['malignancy_probability']:.3f}"
            f" &nbsp; <b>Top 2:</b> {top2}</p>"
        )
    return "".join(rows)


def _scans_block(result: dict[str, Any]) -> str:
    rows = [
        "<h3>Scans and quality control</h3>",
        "<table border='1' cellspacing='0' cellpadding='4'>",
        "<tr><th align='left'>scan</th><th>format</th><th>um/px</th><th>QC</th>"
        "<th align='left'>reasons</th><th>cells</th></tr>",
    ]
    for scan in result.get("scans", []):
        qc = scan.get("qc") or {}
        verdict = qc.get("verdict", "-")
        colour = "#1b5e20" if verdict == "pass" else "#b00020"
        pixel = scan.get("pixel_size_um")
        rows.append(
            f"<tr><td>{_e(Path(str(scan.get('path', ''))).name)}</td>"
            f"<td>{_e(scan.get('format'))}</td>"
            f"<td align='right'>{'-' if pixel is None else f'{pixel:.3f}'}</td>"
            f"<td style='color:{colour}; font-weight:bold;'>{_e(verdict)}</td>"
            f"<td>{_e('; '.join(qc.get('reasons') or []))}</td>"
            f"<td align='right'>{_e(scan.get('cells', 0))}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _pictures_block(result: dict[str, Any]) -> str:
    # Gallery and heatmaps side by side so that the report stays on one A4 page.
    outputs = result.get("outputs") or {}
    gallery = ""
    if "gallery" in outputs:
        gallery = (
            "<b>The 20 cells with the highest attention</b><br>"
            f"<img src='{_e(outputs['gallery'])}' width='400'>"
        )
    heatmaps = [(k, v) for k, v in outputs.items() if k.endswith(":heatmap")]
    maps = ""
    if heatmaps:
        maps = "<b>Attention over each slide</b><br>(blue low, red high)<br>"
        for key, path in heatmaps:
            slide = key.split(":")[1]
            width = {1: 230, 2: 150}.get(len(heatmaps), 100)
            maps += f"<img src='{_e(path)}' width='{width}'><br><small>{_e(slide)}</small><br>"
    if not gallery and not maps:
        return ""
    return (
        "<table cellpadding='4'><tr>"
        f"<td valign='top'>{gallery}</td><td valign='top'>{maps}</td></tr></table>"
    )


def _footer(result: dict[str, Any]) -> str:
    bundle = result.get("bundle", {})
    timings = result.get("timings_s") or {}
    timing_text = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    return (
        "<hr><p style='font-size:8pt; color:#555;'>"
        f"Model bundle {_e(bundle.get('name'))} {_e(bundle.get('version'))} "
        f"(intended use: {_e(bundle.get('intended_use'))}, sha256 "
        f"{_e(str(bundle.get('sha256', ''))[:16])}); backend {_e(result.get('backend'))}; "
        f"created {_e(result.get('created'))}.<br>Timings: {_e(timing_text)}</p>"
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
    """Run ``python -m appliance.report`` on the HTML; ReportPrintError unless it wrote a PDF."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "appliance.report", str(base_dir), str(target)],
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


def _print_pdf(report_html: str, base_dir: Path, target: Path) -> None:
    """The child's work: lay the HTML out with Qt and print it to an A4 PDF."""
    from PySide6.QtCore import QMarginsF, QUrl
    from PySide6.QtGui import (
        QGuiApplication,
        QImage,
        QPageLayout,
        QPageSize,
        QPdfWriter,
        QTextDocument,
    )

    app = QGuiApplication(["cytoedge-report"])  # fonts need an application object
    document = QTextDocument()
    for src in set(re.findall(r"<img src='([^']+)'", report_html)):
        image = QImage(str(base_dir / html.unescape(src)))
        if not image.isNull():
            document.addResource(QTextDocument.ResourceType.ImageResource, QUrl(src), image)
    document.setHtml(report_html)
    writer = QPdfWriter(str(target))
    writer.setPageSize(QPageSize(QPageSize.PageSizeId.A4))
    writer.setPageMargins(QMarginsF(12, 12, 12, 12), QPageLayout.Unit.Millimeter)
    writer.setTitle("cytoedge report")
    writer.setCreator("cytoedge")
    document.print_(writer)
    del writer, document, app  # the PDF is complete once the writer is gone


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m appliance.report BASE_DIR TARGET_PDF < report.html")
    _print_pdf(sys.stdin.buffer.read().decode("utf-8"), Path(sys.argv[1]), Path(sys.argv[2]))
