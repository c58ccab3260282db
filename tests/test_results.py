"""Result folders: complete versions or none, latest.json, pictures, the report, and the
typed result.json (its round trip, its refusals, its published JSON Schema)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

import appliance.results.folder as folder_module
from appliance.results import (
    CaseContent,
    CaseResult,
    ResultError,
    latest_version,
    read_result,
    write_case_result,
)
from appliance.results.pictures import render_heatmap
from appliance.results.report import DEMO_WARNING, render_report_html
from appliance.results.schema import result_json_schema
from cytoedge_demo.samples import sample_content
from runtime.files import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def make_content(
    kind: str = "mm_positive", case_id: str = "case/1", slides: int = 2
) -> CaseContent:
    """What the pipeline hands the writer, for a case of the sample queue's kind."""
    names = tuple(f"smear {n}.tif" for n in range(1, slides + 1))
    return sample_content(case_id, kind, names, seed=3)


def test_a_version_holds_every_output_and_latest_points_at_it(tmp_path: Path) -> None:
    folder, result = write_case_result(tmp_path, make_content())
    assert folder.version == 1 and folder.path.name == "v1"
    # The slash cannot make a subfolder, and "case_1" keeps a folder of its own.
    assert folder.case_dir.parent == tmp_path and folder.case_dir.name.startswith("case_1~")
    assert read_result(folder.path) == result and result.version == 1
    outputs = result.outputs
    for name in (outputs.report_html, outputs.cells_geojson, outputs.gallery):
        assert name is not None and (folder.path / name).is_file(), name
    for scan in result.scans:
        assert scan.outputs is not None
        files = dataclasses.astuple(scan.outputs)
        assert all((folder.path / f).is_file() for f in files), files
    assert [c.image for c in result.top_cells] == [
        f"top_cells/{rank:02d}.png" for rank in range(1, 21)
    ]
    assert all((folder.path / c.image).is_file() for c in result.top_cells)
    assert json.loads((folder.case_dir / "latest.json").read_text()) == {
        "version": 1,
        "path": "v1",
    }
    leftovers = [
        p.name for p in folder.case_dir.rglob("*") if ".tmp-" in p.name or "staging" in p.name
    ]
    assert leftovers == []


def test_rescoring_adds_a_version_and_keeps_the_earlier_one(tmp_path: Path) -> None:
    first, _ = write_case_result(tmp_path, make_content(case_id="c"), write_pdf=False)
    before = (first.path / "result.json").read_bytes()
    second, result = write_case_result(tmp_path, make_content(case_id="c"), write_pdf=False)
    assert second.version == result.version == 2
    assert (first.path / "result.json").read_bytes() == before
    assert latest_version(tmp_path, "c") == second


@pytest.mark.parametrize("failing", ["cells.csv", "gallery.png", "report.html", "result.json"])
def test_a_failure_midway_leaves_no_half_version(
    tmp_path: Path, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case_result(tmp_path, make_content(case_id="c"), write_pdf=False)
    latest_before = (tmp_path / "c" / "latest.json").read_bytes()
    real = {
        name: getattr(folder_module, name)
        for name in ("write_text_atomic", "write_png_atomic", "write_json_atomic")
    }

    def failing_writer(name: str):  # the disk fills up as that file is written
        def write(target: Path, data: object) -> None:
            if target.name == failing:
                raise OSError("disk full")
            real[name](target, data)

        return write

    for name in real:
        monkeypatch.setattr(folder_module, name, failing_writer(name))
    with pytest.raises(OSError, match="disk full"):
        write_case_result(tmp_path, make_content(case_id="c"), write_pdf=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["latest.json", "v1"]
    assert (tmp_path / "c" / "latest.json").read_bytes() == latest_before


def test_the_result_round_trips_through_json_and_every_part_is_typed(tmp_path: Path) -> None:
    _, written = write_case_result(tmp_path, make_content("pb"), write_pdf=False)
    text = json.dumps(written.to_json())
    again = CaseResult.from_json(json.loads(text))
    assert again == written
    (head,) = again.heads
    assert head.kind == "transformer_mil" and head.predictions[0].task == "malignancy"
    assert {f.key for f in head.findings} == {"top2", "hemoglobin"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(schema_version=1), "schema_version 1 is not one this cytoedge reads"),
        (lambda d: d.update(schema_version=4), "schema_version 4 is not one this cytoedge reads"),
        (lambda d: d.update(high_risk="positive"), "unknown key.*high_risk"),
        (lambda d: d["scans"][0].update(cells="many"), r"scans\[0\].cells must be an integer"),
        (lambda d: d.update(status="maybe"), "status must be one of scored, abstained, rejected"),
        (lambda d: d["heads"][0]["predictions"][0].update(call="yes"), "call must be one of"),
        (lambda d: d.pop("bundle"), "bundle is missing"),
    ],
)
def test_a_result_this_code_does_not_write_is_refused_with_one_line(
    tmp_path: Path, change: object, message: str
) -> None:
    folder, _ = write_case_result(tmp_path, make_content(), write_pdf=False)
    data = json.loads((folder.path / "result.json").read_text())
    change(data)  # type: ignore[operator]
    (folder.path / "result.json").write_text(json.dumps(data))
    with pytest.raises(ResultError, match=message) as caught:
        read_result(folder.path)
    assert "\n" not in str(caught.value) and str(folder.path / "result.json") in str(caught.value)


def test_the_published_json_schema_is_the_code_s_and_validates_written_results(
    tmp_path: Path,
) -> None:
    schema = result_json_schema()
    published = json.loads((ROOT / "docs" / "result.schema.json").read_text(encoding="utf-8"))
    assert published == schema, (
        "docs/result.schema.json is stale: python -m appliance.results.publish_schema > "
        "docs/result.schema.json"
    )
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for kind in ("mm_positive", "pb", "qc_failed", "abstained"):
        folder, _ = write_case_result(tmp_path, make_content(kind, case_id=kind), write_pdf=False)
        data = json.loads((folder.path / "result.json").read_text())
        assert list(validator.iter_errors(data)) == []
    data["heads"] = [{"name": "x"}]
    assert list(validator.iter_errors(data)), "a head without its kind must not validate"


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_demo_warning_is_on_demo_reports_only() -> None:
    demo = render_report_html(make_content("mm_positive").result)
    research = render_report_html(make_content("research").result)
    assert DEMO_WARNING in demo
    assert DEMO_WARNING not in research


def test_the_report_states_an_abstention_and_its_reason() -> None:
    html = render_report_html(make_content("abstained").result)
    assert "abstained" in html and "too few cells: 9 (the bundle needs at least 50)" in html


def test_the_report_shows_each_head_s_rows_as_its_kind_made_them() -> None:
    mm = render_report_html(make_content("mm_positive").result)
    assert "High risk (del(17p) or t(4;14))" in mm and "t(4;14)" in mm
    pb = render_report_html(make_content("pb").result)
    assert "malignancy" in pb and "Most likely" in pb and "Hemoglobin (regression)" in pb


def test_the_pdf_is_printed_from_the_same_report(tmp_path: Path) -> None:
    pytest.importorskip("PySide6.QtGui")
    folder, _ = write_case_result(tmp_path, make_content("abstained", case_id="c", slides=1))
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
    folder, _ = write_case_result(tmp_path, make_content(case_id="c"), write_pdf=False)
    gallery = Image.open(folder.path / "gallery.png")
    assert gallery.size == (5 * 128, 4 * (128 + 30))


def test_a_version_2_result_reads_as_version_3_without_the_cell_head(tmp_path: Path) -> None:
    folder, written = write_case_result(tmp_path, make_content(), write_pdf=False)
    data = json.loads((folder.path / "result.json").read_text())
    for key in ("differential", "burden", "warnings", "cell_gallery"):
        data.pop(key)
    data["schema_version"] = 2
    (folder.path / "result.json").write_text(json.dumps(data))
    again = read_result(folder.path)
    assert again.differential is None and again.warnings == () and again.cell_gallery == ()
    assert again.heads == written.heads
