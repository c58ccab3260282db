"""fp16 and int8 encoder variants: conversion, fidelity gates on rendered cells, rejection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_models import assert_fp16_keeps_fp32_edges, meaningful_encoder, peaky_head

import export.int8 as int8
from export.attention_fusion import fuse_attention
from export.cell_images import cell_pixels
from export.encoder import MEAN, STD
from export.fp16 import export_fp16
from export.heads import build_head
from export.int8 import HeadProbe, quantize_encoder
from export.onnx_export import export_encoder, export_head_member
from runtime.parity import row_cosines


@pytest.fixture(scope="module")
def fp32_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("enc") / "encoder.onnx"
    export_encoder(meaningful_encoder("vit_small", seed=11), path, batches=[cell_pixels(2, 1)])
    return path


@pytest.fixture(scope="module")
def mil_probe(tmp_path_factory: pytest.TempPathFactory) -> HeadProbe:
    path = tmp_path_factory.mktemp("head") / "mm.0.onnx"
    head = peaky_head(build_head("gated_attention_mil", {"in_dim": 384}), seed=12)
    export_head_member(head, path, bag_lengths=(16,))
    return HeadProbe("mm", "gated_attention_mil", (path,), {}, head.config.tasks)


def test_cell_pixels_are_deterministic_normalised_cells() -> None:
    pixels = cell_pixels(4, seed=7)
    assert pixels.shape == (4, 3, 224, 224) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, cell_pixels(4, seed=7))
    mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
    images = (pixels.transpose(0, 2, 3, 1) * std + mean) * 255.0
    corner, centre = images[:, :20, :20].mean(), images[:, 100:124, 100:124].mean()
    assert corner > 190 and centre < 150  # pale background, dark nucleus in the middle
    blue_over_red = images[:, 100:124, 100:124, 2].mean() / images[:, 100:124, 100:124, 0].mean()
    assert blue_over_red > 1.1  # purple (basophilic) nucleus


def test_fp16_keeps_float32_io_and_fp32_layernorm_softmax(fp32_encoder: Path) -> None:
    out = fp32_encoder.with_name("encoder.fp16.onnx")
    report = export_fp16(fp32_encoder, out, [cell_pixels(2, seed=13)])
    print(report.summary())
    assert report.passed and report.metrics["min_cosine"] >= 0.999
    model = onnx.load(str(out))
    assert_fp16_keeps_fp32_edges(model, layer_norms=25)  # 12 blocks x 2 + the final norm


def test_dynamic_int8_is_accepted_on_rendered_cells_with_unchanged_calls(
    fp32_encoder: Path, mil_probe: HeadProbe
) -> None:
    out = fp32_encoder.with_name("encoder.int8.onnx")
    result = quantize_encoder(fp32_encoder, out, heads=[mil_probe], pixels=cell_pixels(16, 14))
    print(result.reason, result.metrics)
    assert result.accepted and result.method == "dynamic"
    assert result.metrics["min_cosine"] >= 0.99 and result.metrics["head_calls_changed"] == 0
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    # 12 blocks: attention as QAttention, the other 36 Linear layers as int8 matmuls
    assert ops["QAttention"] == 12 and result.metrics["qattention_blocks"] == 12
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] == 36


def test_attention_fusion_rewrites_every_block_without_changing_the_embeddings(
    fp32_encoder: Path,
) -> None:
    plain = onnx.load(str(fp32_encoder))
    fused = onnx.load(str(fp32_encoder))
    assert fuse_attention(fused) == 12
    onnx.checker.check_model(fused)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 12 and ops["Softmax"] == 0 and ops["Split"] == 0
    pixels = cell_pixels(3, seed=15)
    (reference,) = _session(plain).run(["embedding"], {"pixels": pixels})
    (candidate,) = _session(fused).run(["embedding"], {"pixels": pixels})
    assert row_cosines(reference, candidate).min() >= 0.99999
    assert fuse_attention(fused) == 0  # nothing left to match


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_int8_that_misses_the_gate_writes_nothing_and_says_why(
    fp32_encoder: Path, mil_probe: HeadProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bar no int8 model can clear: both dynamic and the static QDQ fallback must fail.
    monkeypatch.setattr(int8, "INT8_MIN_COSINE", 0.9999999)
    out = fp32_encoder.parent / "rejected" / "encoder.int8.onnx"
    result = quantize_encoder(fp32_encoder, out, heads=[mil_probe], pixels=cell_pixels(16, 15))
    print(result.reason)
    assert not result.accepted and result.path is None
    assert "dynamic: min cosine" in result.reason and "static-qdq: min cosine" in result.reason
    assert result.reason.startswith("int8 rejected, bundle keeps fp32")
    assert list(out.parent.iterdir()) == []
