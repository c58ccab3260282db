"""int8 StarDist for CPU sites: the detection gate accepts and refuses, the bundle lists
the accepted file, and ONNX Runtime's CPU backend loads it (others keep fp32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.pipeline.segmentation import (
    Detections,
    SegmentationError,
    Segmenter,
    match_detections,
)
from runtime.backends import RuntimeSettings
from runtime.bundle_format import BundleError, SegmenterSpec, segmenter_variants
from runtime.typed_json import parse_section
from tests.conftest import SHARED_DATA
from tests.segmenter_model import tensorflow_available, trained_stardist

needs_tensorflow = pytest.mark.skipif(
    not tensorflow_available(), reason="TensorFlow / tf2onnx not installed (export extra)"
)


def round_objects(centres: list[tuple[int, int]], radius: float) -> Detections:
    points = np.asarray(centres, np.int64).reshape(-1, 2)
    dist = np.full((len(points), 32), radius, np.float32)
    return Detections(points, dist, np.full(len(points), 0.9, np.float32))


def test_detections_match_polygon_by_polygon() -> None:
    reference = round_objects([(40, 40), (40, 52), (120, 120)], 10.0)  # two overlap
    assert match_detections(reference, reference, (200, 200)).true_positives == 3
    moved = round_objects([(40, 41), (40, 52), (160, 160), (10, 150)], 10.0)
    counts = match_detections(reference, moved, (200, 200))
    assert (counts.true_positives, counts.false_negatives, counts.false_positives) == (2, 1, 2)
    assert match_detections(reference, round_objects([], 10.0), (200, 200)).false_negatives == 3


def test_the_section_lists_int8_only_as_a_variant() -> None:
    base = {
        "file": "segmenter.onnx",
        "n_rays": 32,
        "grid": [2, 2],
        "div_by": [16, 16],
        "prob_thresh": 0.5,
        "nms_thresh": 0.3,
        "input_channels": 3,
    }
    old = parse_section(SegmenterSpec, base, "segmenter")  # a bundle made before int8
    assert old.variants == {} and segmenter_variants(Path("b"), old).int8 is None
    spec = parse_section(
        SegmenterSpec, {**base, "variants": {"int8": "segmenter.int8.onnx"}}, "segmenter"
    )
    assert segmenter_variants(Path("b"), spec).int8 == Path("b/segmenter.int8.onnx")
    with pytest.raises(BundleError, match="variants"):
        parse_section(SegmenterSpec, {**base, "variants": {"fp16": "x.onnx"}}, "segmenter")


def test_bundle_assembly_carries_the_int8_file() -> None:
    from export.bundle_assembly import _model_files, _relocated

    spec = SegmenterSpec(
        "onnx/segmenter.onnx", 32, (2, 2), (16, 16), 0.5, 0.3, 3,
        variants={"int8": "onnx/segmenter.int8.onnx"},
    )  # fmt: skip
    assert _model_files(spec) == ["onnx/segmenter.onnx", "onnx/segmenter.int8.onnx"]
    placed = _relocated(spec, "")
    assert (placed.file, placed.variants) == ("segmenter.onnx", {"int8": "segmenter.int8.onnx"})


@pytest.mark.slow
@needs_tensorflow
def test_int8_passes_its_gate_and_the_cpu_backend_loads_it(tmp_path: Path) -> None:
    from cytoedge_demo.synthetic import segmentation_tiles
    from export.segmenter_int8 import CALIBRATION_PX, INT8_FILE, quantize_segmenter

    _, onnx_dir, section = trained_stardist()
    calibration, _ = segmentation_tiles(4, CALIBRATION_PX, 1)  # the recipe's training seeds
    gate, truth = segmentation_tiles(8, 512, 777)  # held out
    shutil.copy(onnx_dir / section["file"], tmp_path / section["file"])
    outcome = quantize_segmenter(
        tmp_path / section["file"],
        tmp_path / INT8_FILE,
        section,
        calibration=calibration,
        gate_tiles=gate,
        gate_truth=truth,
        threads=2,
    )
    assert outcome.accepted, outcome.reason
    assert (tmp_path / INT8_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [INT8_FILE, section["file"]]
    assert outcome.metrics["missing"] == 0
    assert outcome.metrics["extra"] <= 0.01 * outcome.metrics["reference_detections"]
    assert outcome.metrics["f1_change"] <= 0.01

    listed = {**section, "variants": {"int8": INT8_FILE}}
    cpu = Segmenter.open(tmp_path, listed, RuntimeSettings("ort-cpu", threads=2))
    assert cpu.network.variant == cpu.variant == "int8"  # type: ignore[attr-defined]
    assert cpu.network.path.name == INT8_FILE  # type: ignore[attr-defined]
    assert len(cpu.detect(gate[0])) > 0
    plain = Segmenter.open(tmp_path, section, RuntimeSettings("ort-cpu", threads=2))
    assert plain.network.variant == plain.variant == "fp32"  # type: ignore[attr-defined]
    (tmp_path / INT8_FILE).unlink()
    with pytest.raises(SegmentationError, match="not found"):
        Segmenter.open(tmp_path, listed, RuntimeSettings("ort-cpu", threads=2))


def without_confident_objects(fp32: Path, out: Path) -> None:
    """The network with the bias of its probability layer lowered by 20: nothing found."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    producer = {o: n for n in model.graph.node for o in n.output}
    sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    conv = producer[sigmoid.input[0]]
    assert conv.op_type == "Conv" and len(conv.input) == 3
    bias = next(t for t in model.graph.initializer if t.name == conv.input[2])
    values = numpy_helper.to_array(bias) - np.float32(20.0)
    bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias.name))
    onnx.save(model, str(out))


@pytest.mark.slow
@needs_tensorflow
def test_gate_refuses_an_int8_network_that_loses_detections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import export.segmenter_int8 as int8
    from cytoedge_demo.synthetic import segmentation_tiles

    _, onnx_dir, section = trained_stardist()
    gate, truth = segmentation_tiles(2, 512, 777)
    monkeypatch.setattr(
        int8,
        "quantise_candidate",
        lambda fp32, out, *_a, **_k: without_confident_objects(fp32, out),
    )
    outcome = int8.quantize_segmenter(
        onnx_dir / section["file"],
        tmp_path / int8.INT8_FILE,
        section,
        calibration=gate[:1],
        gate_tiles=gate,
        gate_truth=truth,
        threads=2,
    )
    assert not outcome.accepted
    assert outcome.reason.startswith("int8 rejected, bundle keeps fp32")
    assert "unmatched at IoU 0.5" in outcome.reason and "F1" in outcome.reason
    assert outcome.metrics["matched"] == 0 < outcome.metrics["missing"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_tensorflow
def test_export_records_the_int8_outcome_in_both_documents(tmp_path: Path) -> None:
    from export.segmenter_int8 import INT8_FILE, add_int8_to_export

    _, onnx_dir, _ = trained_stardist()
    folder = tmp_path / "export"
    shutil.copytree(onnx_dir, folder)
    outcome = add_int8_to_export(folder, threads=2)
    export_doc = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    segmenter_doc = json.loads((folder / "segmenter.json").read_text(encoding="utf-8"))
    assert export_doc["section"] == segmenter_doc["segmenter"]
    assert export_doc["section"]["int8_note"] == outcome.reason
    assert export_doc["provenance"]["int8"]["accepted"] is outcome.accepted
    listed = export_doc["section"].get("variants", {})
    assert listed == ({"int8": INT8_FILE} if outcome.accepted else {})
    assert (folder / INT8_FILE).is_file() is outcome.accepted


BCCD = SHARED_DATA / "bccd-sample"
needs_bccd = pytest.mark.skipif(not BCCD.is_dir(), reason="shared data (bccd-sample) absent")


@needs_bccd
def test_gate_tiles_are_the_folders_readable_photos_at_the_working_grid() -> None:
    from export.segmenter_int8 import read_gate_tiles

    gate = read_gate_tiles(BCCD, 0.07)  # 640 x 480 px at about 0.07 um/px (its README)
    assert gate.names == [f"BloodImage_{n:05d}.jpg" for n in (300, 301, 302, 303, 304, 305, 307)]
    assert [t.shape for t in gate.tiles] == [(134, 179, 3)] * 7  # 0.25 um/px
    assert gate.tiles[0].dtype == np.uint8
    (skipped,) = gate.skipped  # BloodImage_00306.jpg is an empty file
    assert skipped.startswith("BloodImage_00306.jpg (")
    assert gate.description.startswith("7 field photos of bccd-sample at 0.25 um/px")
    assert "1 unreadable left out: BloodImage_00306.jpg" in gate.description


@needs_bccd
def test_a_folder_without_a_readable_photo_is_refused_in_one_line(tmp_path: Path) -> None:
    from export.segmenter_int8 import GateTilesError, read_gate_tiles

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here", encoding="utf-8")
    with pytest.raises(GateTilesError, match="no image files") as raised:
        read_gate_tiles(empty)
    assert str(empty) in str(raised.value) and "\n" not in str(raised.value)

    unknown = tmp_path / "no-pixel-size"
    unknown.mkdir()
    shutil.copy(BCCD / "BloodImage_00300.jpg", unknown)  # no sidecar, no metadata
    (unknown / "broken.jpg").write_bytes(b"")
    with pytest.raises(GateTilesError, match="2 image file") as raised:
        read_gate_tiles(unknown)
    assert "none readable" in str(raised.value) and "\n" not in str(raised.value)
    assert read_gate_tiles(unknown, 0.07).names == ["BloodImage_00300.jpg"]  # the flag
    with pytest.raises(GateTilesError, match="not a folder"):
        read_gate_tiles(tmp_path / "missing")


def test_the_command_checks_gate_tiles_before_exporting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from appliance.cli.main import app

    empty = tmp_path / "gate"
    empty.mkdir()
    model = tmp_path / "not-a-model"  # never reached: the gate folder is read first
    model.mkdir()
    out = tmp_path / "out"
    base = ["export", "segmenter", str(model), "--out", str(out), "--gate-tiles", str(empty)]
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 2 and "add --int8" in result.output
    result = CliRunner().invoke(app, [*base, "--int8"])
    assert result.exit_code == 2
    assert "no field photo to gate int8 on" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
@needs_tensorflow
@needs_bccd
def test_int8_gated_on_real_photos_records_them(tmp_path: Path) -> None:
    from export.segmenter_int8 import INT8_FILE, add_int8_to_export, read_gate_tiles

    _, onnx_dir, _ = trained_stardist()
    folder = tmp_path / "export"
    shutil.copytree(onnx_dir, folder)
    gate = read_gate_tiles(BCCD, 0.07)
    outcome = add_int8_to_export(folder, threads=2, gate=gate)
    document = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    record = document["provenance"]["int8"]
    assert record["gate_tiles"] == gate.description
    assert record["gate_tiles"].startswith("7 field photos of bccd-sample")
    assert record["gate"] == outcome.metrics and outcome.metrics["reference_detections"] > 0
    assert "F1" not in outcome.reason  # real photos come without instance masks
    if outcome.accepted:
        assert "on 7 tiles" in outcome.reason and (folder / INT8_FILE).is_file()
    else:
        assert outcome.metrics["missing"] > 0 or outcome.metrics["extra"] > 0
        assert not (folder / INT8_FILE).exists()
