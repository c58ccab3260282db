"""TensorRT engine builds for export: clear errors without TensorRT, the gates' logic, and a
real build where TensorRT and a GPU exist (skipped cleanly otherwise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_models import meaningful_encoder, peaky_head
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from appliance.cli.main import app
from export.cell_images import cell_pixels
from export.crop_input import fold_crop_input
from export.encoder import MEAN, STD
from export.heads import build_head
from export.onnx_export import ParityError, export_encoder, export_head_member, ort_session
from export.targets import TENSORRT
from export.tensorrt_build import (
    EngineTarget,
    TensorRTUnavailableError,
    build_checked_engine,
    encoder_engine_parity,
    head_engine_parity,
    require_tensorrt,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


class OrtAsEngine:
    """Stands in for runtime's TensorrtBackend (same .inputs / .run) to test the gate."""

    def __init__(self, path: Path, shift: float = 0.0) -> None:
        self._session = ort_session(path)
        self._shift = shift
        spec = self._session.get_inputs()[0]
        self.inputs = [type("Spec", (), {"shape": (None, spec.shape[1])})()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = feeds["features"].astype(np.float16).astype(np.float32)  # fp16 inputs
        (probabilities,) = self._session.run(["probabilities"], {"features": features})
        return {"probabilities": probabilities + self._shift}


@pytest.fixture(scope="module")
def mil_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("head") / "mm.0.onnx"
    head = peaky_head(build_head("gated_attention_mil", {"in_dim": 384}), seed=30)
    export_head_member(head, path, bag_lengths=(7,))
    return path


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_error_is_clear_and_the_cli_exits_2(tmp_path: Path) -> None:
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        require_tensorrt()
    result = CliRunner().invoke(app, ["export", "engines", str(tmp_path)])
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.output


def test_head_gate_passes_fp16_rounding_and_fails_changed_calls(mil_onnx: Path) -> None:
    reference = ort_session(mil_onnx)
    target = EngineTarget(mil_onnx, "head", "gated_attention_mil", ("a", "b", "c", "d"), {})
    lengths = (1, 7, 512)
    passed = head_engine_parity(OrtAsEngine(mil_onnx), reference, target, lengths)
    print(passed.summary())
    assert passed.passed and passed.metrics["max_probability_diff"] < 1e-2

    # every probability +0.2: some calls at the 0.5 default threshold must flip
    shifted = head_engine_parity(OrtAsEngine(mil_onnx, shift=0.2), reference, target, lengths)
    print(shifted.summary())
    assert not shifted.passed and shifted.metrics["bags_with_changed_calls"] >= 1


class OrtAsEncoderEngine:
    """An encoder engine stand-in: ONNX Runtime with fp16-rounded outputs, plus ``noise``."""

    def __init__(self, path: Path, noise: float = 0.0) -> None:
        self._session = ort_session(path)
        self._noise = noise

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (embedding,) = self._session.run(["embedding"], feeds)
        noise = np.random.default_rng(0).normal(0.0, self._noise, embedding.shape)
        return {"embedding": (embedding + noise).astype(np.float16)}


def pooling_encoder(path: Path) -> Path:
    """A small encoder with the real contract: pixels (N, 3, 224, 224) -> embedding (N, 16)."""
    weights = np.random.default_rng(1).normal(size=(192, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "AveragePool", ["pixels"], ["pooled"], kernel_shape=[28, 28], strides=[28, 28]
            ),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["embedding"]),
        ],
        "pooling_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(weights, "weights")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("crop_px", [0, 128])
def test_encoder_gate_passes_fp16_rounding_and_fails_changed_embeddings(
    tmp_path: Path, crop_px: int
) -> None:
    path = pooling_encoder(tmp_path / "encoder.onnx")
    if crop_px:  # a folded encoder is fed rendered uint8 crops instead
        fold_crop_input(path, path, crop_px, 224, MEAN, STD)
    reference = ort_session(path)
    assert reference.get_inputs()[0].name == ("crops" if crop_px else "pixels")
    passed = encoder_engine_parity(OrtAsEncoderEngine(path), reference, path.name)
    print(passed.summary())
    assert passed.passed and passed.metrics["rows"] == 65
    assert passed.limits == {"min_cosine": f">= {TENSORRT.min_cosine}"}
    failed = encoder_engine_parity(OrtAsEncoderEngine(path, noise=5.0), reference, path.name)
    print(failed.summary())
    assert not failed.passed and failed.metrics["min_cosine"] < TENSORRT.min_cosine


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()), reason="needs TensorRT >= 10 and a GPU"
)
def test_engines_build_and_pass_their_gates_on_this_gpu(tmp_path: Path, mil_onnx: Path) -> None:
    encoder_onnx = tmp_path / "encoder.onnx"
    export_encoder(meaningful_encoder("vit_small", 31), encoder_onnx, batches=[cell_pixels(2, 1)])
    engines = tmp_path / "engines"
    for target in (
        EngineTarget(encoder_onnx, "encoder"),
        EngineTarget(mil_onnx, "head", "gated_attention_mil", (), {}),
    ):
        try:
            engine_path, report = build_checked_engine(target, engines)
        except ParityError as error:
            pytest.fail(str(error))
        print(report.summary())
        assert engine_path.is_file() and engine_path.with_name(engine_path.name + ".json").is_file()
