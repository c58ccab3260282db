"""Result folders: complete versions or none, latest.json, pictures, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.results.report import DEMO_WARNING, render_report_html
from appliance.results import (
    CaseOutputs,
    SlideOutputs,
    latest_version,
    render_heatmap,
    write_case_result,
)
from runtime.files import atomic_path


def make_outputs(intended_use: str = "demo", status: str = "scored") -> CaseOutputs:
    rng = np.random.default_rng(0)
    n = 60
    xy = rng.uniform(0, 2000, (n, 2))
    attention = rng.random(n)
    attention /= attention.sum()
    slide = SlideOutputs(
        slide_id="smear 1",
        thumbnail=np.full((100, 100, 3), 230, np.uint8),
        thumbnail_scale=20.0,
        cell_xy=xy,
        attention=attention,
        cells_csv="cell_id,x,y,attention\n0,1.0,2.0,0.1\n",
        geojson={"type": "FeatureCollection", "features": [{"type": "Feature", "id": "0"}]},
    )
    result = {
        "case_id": "case/1",
        "status": status,
        "abstain_reason": None if status == "scored" else "only 12 cells (minimum 50)",
        "bundle": {"name": "b", "version": "1", "sha256": "0" * 64, "intended_use": intended_use},
        "backend": "ort-cpu",
        "timings_s": {"encode": 1.5},
        "scans": [
            {"path": "/in/smear 1.tif", "qc": {"verdict": "pass", "reasons": []}, "cells": n}
        ],
        "predictions": [
            {
                "task": "t",
                "label": "t(4;14)",
                "probability": 0.9,
                "threshold": 0.4,
                "call": "positive",
            }
        ],
    }
    patches = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(20)]
    return CaseOutputs(
        result=result,
        slides=[slide],
        gallery_patches=patches,
        gallery_captions=[f"#{i + 1}" for i in range(20)],
        embeddings={"embeddings": rng.random((n, 8)).astype(np.float32)},
    )


def test_a_version_holds_every_output_and_latest_points_at_it(tmp_path: Path) -> None:
    folder = write_case_result(tmp_path, "case/1", make_outputs())
    assert folder.version == 1 and folder.path.name == "v1"
    assert folder.case_dir == tmp_path / "case_1"  # the slash cannot make a subfolder
    result = json.loads((folder.path / "result.json").read_text())
    assert result["schema_version"] == 1 and result["version"] == 1
    for name in result["outputs"].values():
        assert (folder.path / name).is_file(), name
    for name in ("report.html", "gallery.png", "cells.geojson", "embeddings.npz"):
        assert (folder.path / name).is_file()
    assert (folder.path / "slides" / "smear_1" / "heatmap.png").is_file()
    assert json.loads((folder.case_dir / "latest.json").read_text()) == {
        "version": 1,
        "path": "v1",
    }
    leftovers = [
        p.name for p in folder.case_dir.rglob("*") if ".tmp-" in p.name or "staging" in p.name
    ]
    assert leftovers == []


def test_rescoring_adds_a_version_and_keeps_the_earlier_one(tmp_path: Path) -> None:
    first = write_case_result(tmp_path, "c", make_outputs(), write_pdf=False)
    before = (first.path / "result.json").read_bytes()
    second = write_case_result(tmp_path, "c", make_outputs(), write_pdf=False)
    assert second.version == 2
    assert (first.path / "result.json").read_bytes() == before
    assert latest_version(tmp_path, "c") == second


@pytest.mark.parametrize("fail_after", ["slides/smear_1", "gallery.png", "report.html"])
def test_a_failure_midway_leaves_no_half_version(tmp_path: Path, fail_after: str) -> None:
    write_case_result(tmp_path, "c", make_outputs(), write_pdf=False)
    latest_before = (tmp_path / "c" / "latest.json").read_bytes()

    def explode(name: str) -> None:
        if name == fail_after:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_case_result(tmp_path, "c", make_outputs(), write_pdf=False, _after_file=explode)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["latest.json", "v1"]
    assert (tmp_path / "c" / "latest.json").read_bytes() == latest_before


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_demo_warning_is_on_demo_reports_only() -> None:
    demo = render_report_html(make_outputs("demo").result)
    research = render_report_html(make_outputs("research").result)
    assert DEMO_WARNING in demo
    assert DEMO_WARNING not in research


def test_the_report_states_an_abstention_and_its_reason() -> None:
    html = render_report_html(make_outputs(status="abstained").result)
    assert "abstained" in html and "only 12 cells (minimum 50)" in html


def test_the_pdf_is_printed_from_the_same_report(tmp_path: Path) -> None:
    pytest.importorskip("PySide6.QtGui")
    folder = write_case_result(tmp_path, "c", make_outputs())
    pdf = (folder.path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    assert b"/Count 1" in pdf  # one page


def test_heatmap_is_red_where_attention_is_high_and_blue_where_low() -> None:
    thumb = np.full((120, 240, 3), 200, np.uint8)
    xy = np.array([[60.0, 60.0]] * 5 + [[180.0, 60.0]] * 5)
    attention = np.array([0.19] * 5 + [0.01] * 5)
    image = np.asarray(render_heatmap(thumb, xy, attention).convert("RGB")).astype(int)
    hot, cold = image[60, 60], image[60, 180]
    assert hot[0] > hot[2] + 40, hot
    assert cold[2] > cold[0] + 40, cold
    untouched = image[5, 120]
    assert tuple(untouched) == (200, 200, 200)


def test_gallery_shows_twenty_cells(tmp_path: Path) -> None:
    folder = write_case_result(tmp_path, "c", make_outputs(), write_pdf=False)
    gallery = Image.open(folder.path / "gallery.png")
    assert gallery.size == (5 * 128, 4 * (128 + 30))
