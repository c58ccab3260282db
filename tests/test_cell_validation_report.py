"""The cell head's part of the validation report (report.json, report.html, report.pdf and
its two pictures) from figures made by hand, at 21 classes and beside a cases table;
the console summary at 80 columns; a new operating point chosen on labelled cells."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from appliance.results import BundleRecord
from appliance.validation.cases_table import read_cases_table
from appliance.validation.cell_measures import CellFigures, CriticalPair, cell_figures
from appliance.validation.cell_section import CONFUSION_PICTURE, COVERAGE_PICTURE
from appliance.validation.measures import ValidationCase, build_report, cell_report
from appliance.validation.pictures import THRESHOLD, confusion_layout, confusion_width
from appliance.validation.recalibrate import RecalibrationError, new_operating_point
from appliance.validation.report import TABLE_COPY, write_validation_report
from appliance.validation.summary import print_summary
from runtime.bundle_format import HeadSpec
from runtime.taxonomy import Taxonomy, load_taxonomy
from runtime.typed_json import dump

MARROW = load_taxonomy("marrow-mll")
BUNDLE = BundleRecord("mm-risk", "3", "a" * 64, "research")
OPERATING_POINT = 0.9


def cell_spec(taxonomy: Taxonomy, point: float = OPERATING_POINT) -> HeadSpec:
    """A cell head's bundle.json section, as export.cell_head.cell_head_spec writes it."""
    return HeadSpec(
        name="cells",
        kind="cell_classifier",
        files=("cells/cell_head_0.onnx",),
        labels={c.name: c.label for c in taxonomy.classes},
        thresholds={"confidence": point},
        calibration={"kind": "temperature", "temperature": 1.25},
        extra={"taxonomy": dump(taxonomy), "target_accuracy": 0.99, "coverage": None},
    )


def marrow_cells() -> tuple[list[str], np.ndarray]:
    """Ten cells of every class but hairy cells, each called right at 0.95; then three
    blasts called lymphocytes (0.97, 0.6, 0.5) and two faggot cells called
    promyelocytes (0.8), both critical, and two eosinophils called monocytes (0.92)."""
    names = MARROW.names
    truth: list[str] = []
    rows: list[np.ndarray] = []

    def cell(true: str, called: str, confidence: float) -> None:
        p = np.full(len(names), (1 - confidence) / (len(names) - 1))
        p[names.index(called)] = confidence
        truth.append(true)
        rows.append(p)

    for name in names:
        if name != "hairy_cell":
            for _ in range(10):
                cell(name, name, 0.95)
    for confidence in (0.97, 0.6, 0.5):
        cell("blast", "lymphocyte", confidence)
    for _ in range(2):
        cell("faggot_cell", "promyelocyte", 0.8)
        cell("eosinophil", "monocyte", 0.92)
    return truth, np.array(rows)


def marrow_figures() -> CellFigures:
    truth, probabilities = marrow_cells()
    return cell_figures(
        MARROW, truth, probabilities, target_accuracy=0.99, confidence_needed=OPERATING_POINT
    )


def pdf_text(path: Path) -> str:
    """The PDF's words on one line, its ligatures ("fi") as letters."""
    text = subprocess.run(
        ["pdftotext", str(path), "-"], capture_output=True, text=True, check=True
    ).stdout
    return " ".join(unicodedata.normalize("NFKC", text).split())


def test_the_cell_section_at_21_classes_in_json_html_pdf_and_pictures(tmp_path: Path) -> None:
    figures = marrow_figures()
    # The hand-made cells, counted by hand.
    assert (figures.cells, figures.critical_errors, figures.critical_errors_sure) == (207, 5, 1)
    assert figures.critical_pairs == (
        CriticalPair("blast", "lymphocyte", 3, 1),
        CriticalPair("faggot_cell", "promyelocyte", 2, 0),
    )
    point = figures.operating_point
    assert (point.coverage, point.accuracy) == (pytest.approx(203 / 207), pytest.approx(200 / 203))
    report = build_report(
        (),
        BUNDLE,
        (),
        kind="validation",
        table=None,
        cells=cell_report(cell_spec(MARROW), figures, "site-cells"),
    )
    files = write_validation_report(tmp_path / "report", report, None)

    # report.json: the figures, typed and dumped; strict JSON (an undefined figure is null).
    data = json.loads(files.json.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["cases_table"] is None and data["cases"] == 0
    cells = data["cells"]
    assert (cells["head"], cells["source"], cells["temperature"]) == ("cells", "site-cells", 1.25)
    assert cells["figures"]["macro_f1"] == pytest.approx(figures.macro_f1)
    assert cells["figures"]["weighted_f1"] == pytest.approx(figures.weighted_f1)
    assert cells["figures"]["confusion"] == [list(row) for row in figures.confusion]
    assert cells["figures"]["critical_pairs"][0] == {
        "true": "blast",
        "called": "lymphocyte",
        "cells": 3,
        "sure": 1,
    }
    hairy = next(c for c in cells["figures"]["classes"] if c["name"] == "hairy_cell")
    assert (hairy["support"], hairy["precision"], hairy["recall"]) == (0, None, None)
    assert not (files.folder / TABLE_COPY).exists()  # no cases table, no copy

    # report.html and report.pdf: the same figures, every class by its label.
    lymphocyte = next(c for c in figures.classes if c.name == "lymphocyte")
    expected = [
        "Cell head cells",
        "207 labelled cells",
        "site-cells",
        f"{figures.macro_f1:.3f}",
        f"{figures.weighted_f1:.3f}",
        f"{200 / 207:.3f}",  # accuracy, every cell called
        f"{203 / 207:.3f}",  # coverage at the operating point
        f"{200 / 203:.3f}",  # accuracy at the operating point
        "does not reach the target 0.990",
        f"{lymphocyte.precision:.3f}",
        "a blast called a normal cell",
        "Faggot cell",
        *(c.label for c in MARROW.classes),
    ]
    page = files.html.read_text()
    for text in expected:
        assert text in page, text
    assert CONFUSION_PICTURE in page and COVERAGE_PICTURE in page

    # The confusion matrix: a cell per (truth, call) in the taxonomy's order.
    labels = [c.label for c in MARROW.classes]
    left, top, side = confusion_layout(labels)
    with Image.open(files.folder / CONFUSION_PICTURE) as picture:
        image = picture.convert("RGB")
    assert image.width == confusion_width(labels)

    def fill(row: int, column: int) -> tuple[int, int, int]:  # inside the cell, off its text
        return image.getpixel((left + column * side + 5, top + row * side + 5))

    blast, lymph, hairy_index = (MARROW.index(n) for n in ("blast", "lymphocyte", "hairy_cell"))
    for index in range(len(labels)):
        r, g, b = fill(index, index)
        if index == hairy_index:
            assert (r, g, b) == (255, 255, 255)  # no cells of that class
        else:
            assert g > r and g > b, labels[index]  # right calls: green on the diagonal
    assert fill(blast, lymph)[0] > fill(blast, lymph)[2]  # wrong calls: orange off it
    frame = image.getpixel((left + lymph * side + 2, top + blast * side + side // 2))
    assert frame == THRESHOLD  # a critical confusion, framed in red
    with Image.open(files.folder / COVERAGE_PICTURE) as picture:
        colours = {colour for _, colour in picture.convert("RGB").getcolors(1 << 20)}
    assert THRESHOLD in colours  # the operating point and the target

    # report.pdf, printed by Qt where the window's extra is installed.
    if importlib.util.find_spec("PySide6") is None or not shutil.which("pdftotext"):
        pytest.skip("PySide6 or pdftotext is absent: report.pdf is not checked")
    assert files.pdf is not None
    printed = pdf_text(files.pdf)
    for text in expected:
        assert text in printed, text


def test_a_report_of_cases_and_of_a_two_class_cell_head(tmp_path: Path) -> None:
    """cytoedge train's out-of-fold report: its cases and its cell head's figures."""
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "cases.csv").write_text("case_id,scans,diagnosis\nPB-1,a.png,MDS\n")
    table = read_cases_table(tmp_path / "cases.csv")
    two = Taxonomy(name="two", title="Plasma cells and the rest", classes=MARROW.classes[16:21:4])
    assert two.names == ("plasma_cell", "other_cell")
    truth = ["plasma_cell"] * 3 + ["other_cell"] * 5
    probabilities = np.array([[0.9, 0.1]] * 2 + [[0.3, 0.7]] + [[0.2, 0.8]] * 4 + [[0.6, 0.4]])
    figures = cell_figures(two, truth, probabilities, target_accuracy=0.99)
    case = ValidationCase("PB-1", {"diagnosis": "MDS"}, "rejected", "no usable scan")
    report = build_report(
        (),
        BUNDLE,
        [case],
        kind="out-of-fold",
        table=table,
        cells=cell_report(cell_spec(two), figures, "crops"),
    )
    files = write_validation_report(tmp_path / "report", report, table)
    data = json.loads(files.json.read_text())
    assert data["cases_table"] == "cases.csv" and data["cells"]["figures"]["cells"] == 8
    assert data["cells"]["figures"]["confusion"] == [[2, 1], [1, 4]]
    # Out of fold, the operating point is chosen: 0.8 (4 right, then 0.7 at 1 wrong of 7).
    assert data["cells"]["figures"]["operating_point"]["confidence"] == pytest.approx(0.8)
    page = files.html.read_text()
    for text in (
        "cases.csv",
        "PB-1",
        "8 labelled cells from crops",
        "fold model that did not see it",
    ):
        assert text in page, text
    assert "The taxonomy names no confusion dangerous" in page
    assert (files.folder / TABLE_COPY).is_file()
    with Image.open(files.folder / CONFUSION_PICTURE) as picture:
        assert picture.width == confusion_width(["Plasma cell", "Other cell"])


def test_the_cell_summary_keeps_class_names_whole_at_80_columns() -> None:
    names = MARROW.names
    truth = ["abnormal_eosinophil", "immature_lymphocyte", "plasma_cell", "segmented_neutrophil"]
    called = ["eosinophil", "lymphocyte", "immature_lymphocyte", "segmented_neutrophil"]
    probabilities = np.full((4, len(names)), 0.01)
    for row, name in enumerate(called):
        probabilities[row, names.index(name)] = 0.8
    figures = cell_figures(MARROW, truth, probabilities, confidence_needed=0.5)
    report = build_report(
        (),
        BundleRecord("mm-pb-risk-2611", "12", "0" * 64, "research"),
        (),
        kind="validation",
        table=None,
        cells=cell_report(cell_spec(MARROW), figures, "cells"),
    )
    out = io.StringIO()
    print_summary(report, Console(file=out, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert "…" not in out.getvalue() and all(len(line) <= 80 for line in lines)
    text = out.getvalue()
    assert f"macro F1 {figures.macro_f1:.3f}" in text
    assert f"weighted F1 {figures.weighted_f1:.3f}" in text
    assert "coverage 1.000, accuracy 0.250" in text and "critical errors: 2, 2 of them" in text
    for true, called_label in (
        ("Abnormal eosinophil", "Eosinophil"),
        ("Plasma cell", "Immature lymphocyte"),
    ):
        row = next(line for line in lines if line.lstrip().startswith(true))
        assert called_label in row and row.split()[-2:] == ["1", "1"], row


def test_a_new_operating_point_is_the_lowest_confidence_that_reaches_the_target() -> None:
    two = Taxonomy(name="two", title="two", classes=MARROW.classes[16:21:4])
    spec = cell_spec(two, point=0.6)
    truth = ["plasma_cell", "plasma_cell", "other_cell", "other_cell"]
    calibrated = np.array([[0.99, 0.01], [0.95, 0.05], [0.9, 0.1], [0.2, 0.8]])
    point = new_operating_point(spec, truth, calibrated)
    assert (point.confidence, point.coverage, point.accuracy, point.reached) == (
        0.95,
        0.5,
        1.0,
        True,
    )
    with pytest.raises(RecalibrationError) as refused:
        new_operating_point(spec, ["other_cell", *truth[1:]], calibrated)
    (line,) = str(refused.value).splitlines()
    assert "no confidence reaches the target accuracy 0.99" in line and "stays 0.600" in line
