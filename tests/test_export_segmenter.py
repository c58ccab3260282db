"""``cytoedge export segmenter``: StarDist -> ONNX behind a parity gate that can fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from tests.segmenter_model import tensorflow_available, trained_stardist

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not tensorflow_available(), reason="TensorFlow / tf2onnx not installed (export extra)"
    ),
]


def perturbed(onnx_bytes: bytes) -> bytes:
    """The same network with one convolution kernel nudged by 5 % of its spread."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    kernels = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert kernels, "no convolution kernels found"
    kernel = kernels[len(kernels) // 2]
    values = numpy_helper.to_array(kernel).copy()
    values += 0.05 * values.std() * np.random.default_rng(0).standard_normal(values.shape)
    kernel.CopyFrom(numpy_helper.from_array(values.astype(np.float32), kernel.name))
    return model.SerializeToString()


def test_export_passes_its_gate_and_writes_the_section() -> None:
    import onnxruntime as ort

    from runtime.bundle_format import SegmenterSpec

    model_dir, onnx_dir, section = trained_stardist()
    assert (model_dir / "cytoedge_normalisation.json").is_file()
    document = json.loads((onnx_dir / "export.json").read_text(encoding="utf-8"))
    assert document["kind"] == "segmenter"
    assert document["section"] == section
    gate = document["parity"]["segmenter.onnx"]
    assert gate["passed"] is True
    assert gate["max_abs_diff"]["prob"] <= 1e-4 and gate["max_abs_diff"]["dist"] <= 2e-3
    assert document["provenance"]["source_sha256"]["weights_best.h5"]
    assert section["n_rays"] == 32 and section["grid"] == [2, 2]
    assert section["div_by"] == [16, 16] and section["input_channels"] == 3
    assert 0 < section["prob_thresh"] < 1 and 0 < section["nms_thresh"] < 1
    assert section["normalisation"]["kind"] == "percentile"
    SegmenterSpec(**{**section, "grid": tuple(section["grid"]), "div_by": (16, 16)}).validate("s")
    session = ort.InferenceSession(str(onnx_dir / "segmenter.onnx"))
    (net_input,) = session.get_inputs()
    assert net_input.name == "input" and net_input.shape[3] == 3
    assert not all(isinstance(d, int) for d in net_input.shape[1:3])  # dynamic H, W
    assert [o.name for o in session.get_outputs()] == ["prob", "dist"]


def test_export_bundle_accepts_the_folder() -> None:
    from export.bundle_assembly import read_export

    _, onnx_dir, section = trained_stardist()
    exported = read_export(onnx_dir, "segmenter")
    assert exported.section.file == "segmenter.onnx"
    assert exported.section.n_rays == section["n_rays"]


def test_a_perturbed_network_fails_the_gate_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import export.segmenter as module

    model_dir, _, _ = trained_stardist()
    convert = module.convert_to_onnx
    monkeypatch.setattr(module, "convert_to_onnx", lambda *a: perturbed(convert(*a)))
    out = tmp_path / "out"
    with pytest.raises(module.ParityError) as raised:
        module.export_segmenter(model_dir, out, threads=2)
    report = raised.value.report
    assert not report.passed
    assert max(report.max_abs_diff["prob"] / 1e-4, report.max_abs_diff["dist"] / 2e-3) > 1
    assert "parity gate failed" in str(raised.value) and "max |diff|" in str(raised.value)
    assert not out.exists() or not any(out.iterdir())

    result = CliRunner().invoke(app, ["export", "segmenter", str(model_dir), "--out", str(out)])
    assert result.exit_code == 1
    assert "parity gate failed" in result.output and "nothing written" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_command_line_export_and_bad_folders(tmp_path: Path) -> None:
    model_dir, _, section = trained_stardist()
    out = tmp_path / "exported"
    result = CliRunner().invoke(
        app, ["export", "segmenter", str(model_dir), "--out", str(out), "--threads", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "parity passed" in result.output
    written = json.loads((out / "segmenter.json").read_text(encoding="utf-8"))["segmenter"]
    assert written == section

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = CliRunner().invoke(app, ["export", "segmenter", str(empty), "--out", str(out)])
    assert result.exit_code == 1
    assert "not a StarDist model folder" in result.output
    result = CliRunner().invoke(app, ["export", "segmenter", "--out", str(out)])
    assert result.exit_code == 2
