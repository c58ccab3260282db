"""report.pdf is printed by Qt in a short-lived child process, with a timeout."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from appliance.results import CaseOutputs
from appliance.results.report import (
    ReportPrintError,
    print_pdf_in_child,
    render_report_html,
    write_report_pdf,
)
from cytoedge_demo.samples import sample_content

pytest.importorskip("PySide6.QtGui")

RESULT = dataclasses.replace(
    sample_content("c-1", "abstained", ("a.tif",)).result,
    version=1,
    outputs=CaseOutputs(report_html="report.html", cells_geojson="", gallery="gallery.png"),
)


def _report_folder(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "gallery.png")
    return tmp_path


def test_the_pdf_is_written_with_its_picture_and_qt_stays_out_of_this_process(
    tmp_path: Path,
) -> None:
    folder = _report_folder(tmp_path)
    html = render_report_html(RESULT)
    # A fresh interpreter, so that no other test's Qt import can hide one made here.
    script = (
        "import sys; from pathlib import Path; "
        "from appliance.results.report import write_report_pdf; "
        f"ok = write_report_pdf(sys.stdin.read(), Path({str(folder)!r}), "
        f"Path({str(folder / 'report.pdf')!r})); "
        "print(ok, 'PySide6.QtGui' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=html, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
    pdf = (folder / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/Count 1" in pdf
    assert b"/Subtype /Image" in pdf  # the gallery resolved against the result folder
    assert sorted(p.name for p in folder.iterdir()) == ["gallery.png", "report.pdf"]


def test_a_printer_that_does_not_finish_in_time_is_stopped_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _report_folder(tmp_path)
    with caplog.at_level(logging.ERROR, logger="appliance.results.report"):
        made = write_report_pdf(
            render_report_html(RESULT), folder, folder / "report.pdf", timeout=0.05
        )
    assert made is False
    assert "did not finish within 0.05 s" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["gallery.png"]  # no partial file


def test_a_printer_that_writes_nothing_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ReportPrintError, match="the PDF printer wrote no PDF"):
        print_pdf_in_child("<p>x</p>", tmp_path, tmp_path / "missing-dir" / "report.pdf")
