"""NNCF's static int8 of the encoder: made by ``export encoder --int8-static`` from a
DinoBloom checkpoint, held to the int8 gate on OpenVINO, refused when it drifts, and
run by the openvino backend as its precision ``int8``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from export_models import meaningful_encoder, write_dinobloom_checkpoint
from typer.testing import CliRunner

import export.int8_static as int8_static
from appliance.cli.main import app
from export.cell_images import cell_pixels
from export.onnx_export import ort_session
from runtime.backends import ModelVariants, RuntimeSettings, open_model
from runtime.backends.ov import OpenVinoBackend
from runtime.parity import INT8_MIN_COSINE, row_cosines

pytest.importorskip("nncf")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``export encoder --int8-static`` of a seeded ViT-S in the official checkpoint format."""
    work = tmp_path_factory.mktemp("static")
    checkpoint = write_dinobloom_checkpoint(
        meaningful_encoder("vit_small", seed=3), work / "DinoBloom-S.pth"
    )
    out = work / "encoder"
    result = CliRunner().invoke(
        app,
        [
            *("export", "encoder", "--arch", "vit_small", "--checkpoint", str(checkpoint)),
            *("--int8-static", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_the_static_int8_passes_its_gate_and_is_a_bundle_variant(
    exported: tuple[Path, str],
) -> None:
    out, output = exported
    print(output)  # the gate's figures, kept in the test log
    document = json.loads((out / "export.json").read_text())
    assert document["section"]["variants"] == {
        "fp32": "encoder.onnx",
        "int8_static": "encoder.int8-static.onnx",
    }
    assert "int8-static (NNCF) accepted for openvino" in document["section"]["int8_note"]
    gate = document["parity"]["encoder.int8-static.onnx"]
    assert gate["passed"] and gate["min_cosine"] >= INT8_MIN_COSINE
    assert gate["head_calls_changed"] == 0
    # It is static int8: quantise/dequantise pairs in the graph, not ORT's dynamic ops.
    import onnx

    ops = {node.op_type for node in onnx.load(str(out / "encoder.int8-static.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "DynamicQuantizeLinear" not in ops


@pytest.mark.slow
def test_openvino_runs_it_as_its_int8_precision(exported: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = exported
    variants = ModelVariants(
        fp32=out / "encoder.onnx", int8_static=out / "encoder.int8-static.onnx"
    )
    assert OpenVinoBackend.precisions(variants)[-1] == "int8"
    assert "int8" not in OpenVinoBackend.precisions(ModelVariants(fp32=variants.fp32))
    model = open_model(
        variants, RuntimeSettings("openvino", precision="int8", threads=1), engine_dir=tmp_path
    )
    assert (model.name, model.variant, model.path.name) == (
        "openvino",
        "int8",
        "encoder.int8-static.onnx",
    )
    pixels = cell_pixels(8, seed=77)  # cells neither calibration nor the gate saw
    (reference,) = ort_session(variants.fp32).run(["embedding"], {"pixels": pixels})
    got = model.run({"pixels": pixels})["embedding"]
    assert row_cosines(reference, got).min() >= INT8_MIN_COSINE


@pytest.mark.slow
def test_a_drifting_static_int8_is_refused_and_nothing_is_written(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny bundle's encoder: the refusal is the gate's, whatever the network's size."""
    from runtime.bundle_format import load_bundle

    base = load_bundle(tiny_bundle)
    real_run = int8_static._run

    def drifting(path: Path, pixels: np.ndarray) -> np.ndarray:  # stands in for a bad int8
        embeddings = real_run(path, pixels)
        noise = np.random.default_rng(0).normal(0, embeddings.std(), embeddings.shape)
        return embeddings + noise.astype(embeddings.dtype)

    monkeypatch.setattr(int8_static, "_run", drifting)
    target = tmp_path / "encoder.int8-static.onnx"
    result = int8_static.quantize_encoder_static(base.file(base.encoder.variants["fp32"]), target)
    assert not result.accepted
    assert result.reason.startswith("int8-static rejected: min cosine ")
    assert result.metrics["min_cosine"] < INT8_MIN_COSINE
    assert list(tmp_path.iterdir()) == []  # no candidate, no staging folder left


def test_without_nncf_it_is_a_note_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_nncf(name: str, *args: object, **kwargs: object) -> object:
        if name == "nncf":
            raise ImportError("No module named 'nncf'", name="nncf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    result = int8_static.quantize_encoder_static(tmp_path / "encoder.onnx", tmp_path / "out.onnx")
    assert (result.accepted, result.reason) == (
        False,
        "int8-static not tried: nncf is not installed",
    )
    assert not (tmp_path / "out.onnx").exists()


def test_the_self_test_measures_and_gates_it_beside_the_other_cpu_paths(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The tiny bundle with its encoder's static int8 added: ``doctor --self-test``'s
    measurement runs it as ``openvino int8`` and holds it to the int8 limit."""
    import dataclasses

    from appliance.site.backend_check import run_self_test
    from runtime.bundle_format import load_bundle, write_bundle

    base = load_bundle(tiny_bundle)
    static = int8_static.quantize_encoder_static(
        base.file(base.encoder.variants["fp32"]), tmp_path / "encoder.int8-static.onnx"
    )
    assert static.accepted, static.reason
    variants = {**base.encoder.variants, "int8_static": "encoder.int8-static.onnx"}
    bundle = write_bundle(
        tmp_path / "bundle",
        name=base.name,
        version=f"{base.version}-static",
        intended_use=base.intended_use,
        sources={
            **{rel: base.file(rel) for rel in base.files},
            "encoder.int8-static.onnx": tmp_path / "encoder.int8-static.onnx",
        },
        encoder=dataclasses.replace(base.encoder, variants=variants),
        heads=base.heads,
        segmenter=base.segmenter,
        cell_head=base.cell_head,
        stain_reference=base.stain_reference,
        qc=base.qc,
        cells=base.cells,
    )
    assert bundle.encoder_variants().int8_static == bundle.path / "encoder.int8-static.onnx"
    report = run_self_test(
        bundle, RuntimeSettings(threads=1), backends=["ort-cpu", "openvino"], networks=("encoder",)
    )
    rows = {(m.backend, m.variant): m for m in report.measurements}
    assert {("ort-cpu", "fp32"), ("openvino", "fp32"), ("openvino", "int8")} <= set(rows)
    static_row = rows["openvino", "int8"]
    assert static_row.passed, static_row
    assert static_row.limits["min_cosine"] == f">= {INT8_MIN_COSINE}"
    assert static_row.seconds_per_unit > 0
