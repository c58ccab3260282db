"""process_slide / score_case: caching, cases, versions and abstention, on small bundles.

The networks are the runtime's tiny ONNX models (tests/runtime_models.py): the
point here is the orchestration, not the models; tests/test_score_cli.py and
the demo run the real segmenter and encoder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from appliance import slide_cache
from appliance.pipeline import SlideResult, process_slide, score_case
from appliance.scoring import abstain_reason, top_attention_mass
from appliance.synthetic import write_cell_folders
from runtime.bundle import Bundle
from tests.runtime_models import TinyBundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyBundle, Bundle]:
    made = TinyBundle(tmp_path_factory.mktemp("tiny"))
    return made, made.write()


@pytest.fixture(scope="module")
def pb_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pb")
    write_cell_folders(root, 2, 60, seed=3)
    small = root / "small"
    write_cell_folders(small, 1, 12, seed=4)
    return root


def test_a_cell_folder_is_embedded_once_and_then_read_from_the_cache(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    _, bundle = tiny
    stages: list[tuple[str, float]] = []
    first = process_slide(
        pb_folders / "P0001",
        bundle,
        cache_dir=tmp_path,
        progress=lambda s, f: stages.append((s, f)),
    )
    assert first.n_cells == 60 and first.qc_passed and not first.from_cache
    assert {"read", "embed"} <= {s for s, _ in stages}
    assert all(0.0 <= f <= 1.0 for _, f in stages)
    cells = first.cells()
    assert cells.embeddings.shape == (60, bundle.encoder.embed_dim)
    assert cells.patches.shape[0] == 60
    again = process_slide(pb_folders / "P0001", bundle, cache_dir=tmp_path)
    assert again.from_cache and again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(again.cells().embeddings, cells.embeddings)


def test_a_case_over_two_slides_is_scored_and_rescoring_adds_a_version(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    _, bundle = tiny
    cache, outbox = tmp_path / "cache", tmp_path / "out"
    one = process_slide(pb_folders / "P0001", bundle, cache_dir=cache)
    first = score_case("patient-7", [one], bundle, outbox, write_pdf=False)
    assert first.status == "scored" and first.version == 1
    late = process_slide(pb_folders / "P0002", bundle, cache_dir=cache)
    again = process_slide(pb_folders / "P0001", bundle, cache_dir=cache)
    second = score_case("patient-7", [again, late], bundle, outbox, write_pdf=False)
    assert second.version == 2 and again.from_cache
    assert (first.folder.path / "result.json").is_file()  # the earlier version stays

    result = json.loads((second.folder.path / "result.json").read_text())
    assert result["schema_version"] == 1 and result["version"] == 2
    assert [s["slide_id"] for s in result["scans"]] == ["P0001", "P0002"]
    assert sum(s["cells"] for s in result["scans"]) == 120
    assert {p["task"] for p in result["predictions"]} >= {"del17p", "malignancy"}
    assert result["high_risk"] in ("positive", "negative", "indeterminate")
    assert len(result["top2"]) == 2
    assert len(result["top_cells"]) == 20
    for cell in result["top_cells"]:
        assert (second.folder.path / cell["image"]).is_file()
    attention = np.load(second.folder.path / "embeddings.npz")["attention"]
    assert attention.shape == (120,)
    assert result["attention_top20_mass"] == pytest.approx(top_attention_mass(attention))
    csv_header = (second.folder.path / "slides" / "P0002" / "cells.csv").read_text().split("\n")[0]
    assert csv_header.endswith("attention")


def test_too_few_cells_abstain_with_the_count_in_the_reason(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    _, bundle = tiny
    small = process_slide(pb_folders / "small" / "P0001", bundle, cache_dir=tmp_path)
    case = score_case("few", [small], bundle, tmp_path / "out", write_pdf=False)
    assert case.status == "abstained"
    assert case.abstain_reason == "too few cells: 12 (the bundle needs at least 50)"
    assert case.result["predictions"] == []


def test_every_task_indeterminate_abstains(
    tiny: tuple[TinyBundle, Bundle], pb_folders: Path, tmp_path: Path
) -> None:
    made, _ = tiny
    wide = [dataclasses.replace(h, indeterminate_band=0.49) for h in made.heads]
    made.path = tmp_path / "wide-bundle"
    bundle = made.write(heads=wide)
    slide = process_slide(pb_folders / "P0001", bundle, cache_dir=tmp_path)
    case = score_case("unsure", [slide], bundle, tmp_path / "out", write_pdf=False)
    assert case.status == "abstained"
    assert case.abstain_reason is not None and "all tasks indeterminate" in case.abstain_reason
    assert all(p["call"] == "indeterminate" for p in case.result["predictions"])


def test_a_slide_that_failed_qc_makes_the_case_abstain(
    tiny: tuple[TinyBundle, Bundle], tmp_path: Path
) -> None:
    _, bundle = tiny
    entry = tmp_path / "entry"
    empty = slide_cache.SlideCells.empty(
        bundle.encoder.embed_dim, np.full((8, 8, 3), 255, np.uint8), 32.0, 128
    )
    reason = "71 % of tiles blurred"
    slide_cache.write_entry(entry, {"scan": {"sha256": "0" * 64}}, empty)
    failed = SlideResult(
        slide_id="s1",
        path=tmp_path / "s1.tif",
        fingerprint="0" * 64,
        scan={"slide_id": "s1", "qc": {"verdict": "fail", "reasons": [reason]}, "cells": 0},
        qc_passed=False,
        qc_reason=reason,
        n_cells=0,
        cache_entry=entry,
        timings_s={},
        backend="ort-cpu",
    )
    case = score_case("blurred", [failed], bundle, tmp_path / "out", write_pdf=False)
    assert case.status == "abstained"
    assert case.abstain_reason == f"slide QC failed: s1: {reason}"
    html = (case.folder.path / "report.html").read_text()
    assert reason in html


def test_abstain_reason_rules() -> None:
    scored = [{"call": "positive"}, {"call": "indeterminate"}]
    unsure = [{"call": "indeterminate"}] * 2
    assert abstain_reason(80, 50, [], 1, scored) is None
    assert (
        abstain_reason(49, 50, [], 1, scored) == "too few cells: 49 (the bundle needs at least 50)"
    )
    # one slide of two failed QC: the other still carries the case
    assert abstain_reason(80, 50, ["a: blurred"], 2, scored) is None
    assert abstain_reason(0, 50, ["a: blurred"], 1, []) == "slide QC failed: a: blurred"
    assert abstain_reason(80, 50, [], 1, unsure) is not None


def test_top_attention_mass() -> None:
    assert top_attention_mass(np.full(10, 0.1)) == pytest.approx(0.2)
    peaked = np.array([0.91] + [0.01] * 9)
    assert top_attention_mass(peaked) == pytest.approx(0.92)
