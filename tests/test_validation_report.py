"""A validation (or out-of-fold) report names its cases table by what lasts: the table's
name and sha256, and a copy kept in the report's own folder, never the folder the table
was read from (a build's temporary folder is gone by the time anyone reads the report)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from PIL import Image

from appliance.results import BundleRecord
from appliance.validation.cases_table import read_cases_table
from appliance.validation.measures import ValidationCase, build_report
from appliance.validation.report import TABLE_COPY, write_validation_report
from runtime.files import sha256_file


def test_the_report_names_its_table_by_name_and_hash_and_keeps_a_copy(tmp_path: Path) -> None:
    build = tmp_path / ".demo-build-x7q2" / "cohort"
    (build / "scans").mkdir(parents=True)
    Image.new("RGB", (640, 480), (230, 225, 235)).save(build / "scans" / "PB-1.png")
    (build / "holdout.csv").write_text("case_id,scans,diagnosis\nPB-1,scans/PB-1.png,MDS\n")
    table = read_cases_table(build / "holdout.csv")
    case = ValidationCase("PB-1", {"diagnosis": "MDS"}, "rejected", "no usable scan")
    report = build_report(
        (), BundleRecord("demo", "1", "0" * 64, "demo"), [case], kind="validation", table=table
    )
    folder = tmp_path / "report"
    files = write_validation_report(folder, report, table)
    shutil.rmtree(tmp_path / ".demo-build-x7q2")  # the build is over: its folder is gone

    figures = json.loads(files.json.read_text())
    assert (figures["cases_table"], figures["cases_table_sha256"]) == ("holdout.csv", table.sha256)
    assert sha256_file(folder / TABLE_COPY) == table.sha256  # the very bytes that were read
    page = files.html.read_text()
    assert "holdout.csv" in page and table.sha256[:16] in page and TABLE_COPY in page
    texts = [files.json.read_text(), page]
    if files.pdf is not None and shutil.which("pdftotext"):
        texts.append(
            subprocess.run(
                ["pdftotext", str(files.pdf), "-"], capture_output=True, text=True, check=True
            ).stdout
        )
        assert "holdout.csv" in texts[-1]
    for text in texts:
        assert ".demo-build" not in text and str(tmp_path) not in text


def test_a_report_without_a_printer_still_names_and_copies_its_table(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "site cases.csv").write_text("case_id,scans,del(17p)\nMM-1,a.png,1\n")
    table = read_cases_table(tmp_path / "site cases.csv")
    report = build_report(
        (), BundleRecord("mm", "2", "1" * 64, "research"), [], kind="out-of-fold", table=table
    )
    files = write_validation_report(tmp_path / "out", report, table, pdf=False)
    assert files.pdf is None
    assert (tmp_path / "out" / TABLE_COPY).read_bytes() == (
        tmp_path / "site cases.csv"
    ).read_bytes()
    assert json.loads(files.json.read_text())["cases_table"] == "site cases.csv"
