"""report.pdf: printed by Qt in a short-lived child process, with a timeout; one A4 page
that holds every section, checked on the page as poppler renders it."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from appliance.results import CaseOutputs, read_result
from appliance.results.report import (
    ReportPrintError,
    print_pdf_in_child,
    render_report_html,
    write_report_pdf,
)
from appliance.review.sign_off import SignOff, sign_off
from appliance.service.audit import AuditLog
from cytoedge_demo.samples import sample_content, write_sample_result
from runtime.taxonomy import load_taxonomy
from tests.cell_results import MARROW_COUNTS, write_differential_case

pytest.importorskip("PySide6.QtGui")

RESULT = dataclasses.replace(
    sample_content("c-1", "mm_positive", ("a.tif",)).result,
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
    html = render_report_html(RESULT, folder)  # no crops here: the gallery picture instead
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


# --- one A4 page, every section on it, pictures large enough to read -----------------------

PAGE_DPI = 60  # pdftoppm renders the page at this: 1 px = 0.42 mm
GREEN, BLUE = (0, 200, 0), (0, 0, 230)


def painted(folder: Path, result: object) -> None:
    """Each top cell's crop solid green and each heatmap solid blue (same pixel sizes), so
    that the rendered page shows where each picture landed and how large it is."""
    for cell in result.top_cells:
        path = folder / cell.image
        Image.new("RGB", Image.open(path).size, GREEN).save(path)
    for scan in result.scans:
        if scan.outputs is not None:
            path = folder / scan.outputs.heatmap
            Image.new("RGB", Image.open(path).size, BLUE).save(path)


def boxes_mm(page: np.ndarray, colour: tuple[int, int, int]) -> list[tuple[float, float]]:
    """(width, height) in mm of each solid patch of ``colour`` on the rendered page."""
    near = (np.abs(page.astype(int) - colour).sum(axis=2) < 60).astype(np.uint8)
    labels, _ = ndimage.label(near)
    mm = 25.4 / PAGE_DPI
    return [
        ((s[1].stop - s[1].start) * mm, (s[0].stop - s[0].start) * mm)
        for s in ndimage.find_objects(labels)
        if (s[1].stop - s[1].start) > 2 and (s[0].stop - s[0].start) > 2
    ]


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils not installed")
@pytest.mark.parametrize(
    ("kind", "slides", "reason"),
    [
        ("mm_positive", 3, "the smear is thick at the feather edge; " * 3),
        ("mm_positive", 6, ""),
    ],
    ids=["mm-3-slides-rejected", "mm-6-slides"],
)
def test_a_case_prints_on_one_page_with_every_section_readable(
    tmp_path: Path, kind: str, slides: int, reason: str
) -> None:
    names = tuple(f"slide-{n}.svs" for n in range(1, slides + 1))
    folder = write_sample_result(tmp_path, "MM-2611-0416", kind, names, seed=slides)
    result = read_result(folder.path)
    if reason:
        decision = SignOff("rejected", "Dr Ana Reviewer", reason.strip())
        audit = AuditLog(tmp_path / "audit.jsonl")
        folder = sign_off(folder.path, decision, data_dir=tmp_path, audit=audit,
                          write_pdf=False).folder  # fmt: skip
        result = read_result(folder.path)
    painted(folder.path, result)
    pdf = folder.path / "report.pdf"
    print_pdf_in_child(render_report_html(result, folder.path), folder.path, pdf)
    subprocess.run(
        ["pdftoppm", "-r", str(PAGE_DPI), "-png", str(pdf), str(tmp_path / "page")], check=True
    )
    pages = sorted(tmp_path.glob("page-*.png"))
    assert [p.name for p in pages] == ["page-1.png"]  # one page, nothing spilled over
    page = np.asarray(Image.open(pages[0]).convert("RGB"))
    assert page.shape[:2] == (round(297 / 25.4 * PAGE_DPI), round(210 / 25.4 * PAGE_DPI))
    text = subprocess.run(
        ["pdftotext", "-f", "1", "-l", "1", "-layout", str(pdf), "-"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    sections = ["Case MM-2611-0416", "Scans and quality control", "Review:", "Model bundle"]
    sections += ["Calls"] if result.heads else ["No call"]
    if result.top_cells:
        sections.append("The 20 cells with the highest attention")
    if any(scan.outputs for scan in result.scans):
        sections.append("Attention over each slide")
    for section in sections:
        assert section in text, section
    for scan in result.scans:
        assert scan.name in text
    # Every top cell at least 18 mm across, each slide's heatmap at least 25 mm (50 mm when
    # there are at most three), all on page 1.
    cells = boxes_mm(page, GREEN)
    assert len(cells) == len(result.top_cells)
    assert all(w >= 18 and h >= 18 for w, h in cells), cells
    heatmaps = boxes_mm(page, BLUE)
    shown = [s for s in result.scans if s.outputs is not None]
    assert len(heatmaps) == len(shown)
    least = 50 if len(shown) <= 3 else 25
    assert all(max(w, h) >= least for w, h in heatmaps), heatmaps


# --- the cell head's differential and the plasma-cell burden ------------------------------


def pdf_text(pdf: Path) -> str:
    """Page 1's text as poppler lays it out, ligatures undone and whitespace runs made one
    space."""
    text = subprocess.run(
        ["pdftotext", "-f", "1", "-l", "1", "-layout", str(pdf), "-"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils not installed")
@pytest.mark.parametrize(
    ("taxonomy", "counts", "slides"),
    [("marrow-mll", MARROW_COUNTS, 6), ("two-classes", (97, 318), 1)],
    ids=["marrow-21-classes-below-the-minimum-6-slides", "two-classes-1-slide"],
)
def test_the_differential_and_the_burden_print_on_the_one_page(
    tmp_path: Path, taxonomy: str, counts: tuple[int, ...], slides: int
) -> None:
    classes = (
        load_taxonomy("marrow-mll").restricted(("plasma_cell", "other_cell"))
        if taxonomy == "two-classes"
        else load_taxonomy(taxonomy)
    )
    names = tuple(f"slide-{n}.svs" for n in range(1, slides + 1))
    folder = write_differential_case(
        tmp_path / "outbox", "MM-2611-0416", classes, counts, 41, slides=names
    )
    result = read_result(folder.path)
    painted(folder.path, result)
    pdf = folder.path / "report.pdf"
    print_pdf_in_child(render_report_html(result, folder.path), folder.path, pdf)
    subprocess.run(
        ["pdftoppm", "-r", str(PAGE_DPI), "-png", str(pdf), str(tmp_path / "page")], check=True
    )
    pages = sorted(tmp_path.glob("page-*.png"))
    assert [p.name for p in pages] == ["page-1.png"]  # one page, nothing spilled over
    text = pdf_text(pdf)
    found, burden = result.differential, result.burden
    assert found is not None and burden is not None
    assert f"{found.classified} of {found.cells} cells classified, 41 unsure" in text
    assert f"operating point (confidence {found.operating_point:.2f}, for 99 % accuracy" in text
    for row in found.classes:  # the class, its count, its percent with the interval
        assert f"{row.label} {row.count} {row.percent:.1f} ({row.low:.1f}-{row.high:.1f})" in text
    assert burden.sentence() in text
    if burden.below:  # 23 of 348: the warning, at the top too
        assert "below 10 %, outside the burden the model was validated on" in burden.sentence()
        assert f"Warning: {burden.sentence()}" in text
    else:
        assert "Warning:" not in text
    # The crops stay large enough to read beside the longer page.
    cells = boxes_mm(np.asarray(Image.open(pages[0]).convert("RGB")), GREEN)
    assert len(cells) == len(result.top_cells)
    assert all(w >= 18 and h >= 18 for w, h in cells), cells
