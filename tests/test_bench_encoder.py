"""The encoder bench's arithmetic (its figures come from the command, not from tests)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from cytoedge_demo.bench.encoder import PathResult, gflop_per_cell, print_table
from cytoedge_demo.bench.gemm import (
    KERNELS,
    GemmResult,
    GemmShape,
    _kernel_sessions,
    cpu_description,
    linear_layers_ratio,
    linear_shapes,
    measure_gemm_ceiling,
)


def test_vit_b_counts_the_documented_43_9_gflop() -> None:
    torch = pytest.importorskip("torch")
    from export.encoder import build_encoder

    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        base, small = build_encoder("vit_base"), build_encoder("vit_small")
    assert gflop_per_cell(base) == pytest.approx(43.9, abs=0.05)
    assert gflop_per_cell(small) == pytest.approx(11.0, abs=0.05)


def test_table_gives_rates_and_ratios_to_the_first_path() -> None:
    results = [
        PathResult("torch eager fp32", [4.0, 2.0, 3.0], cells=6),  # median 3 s: 2 cells/s
        PathResult("ORT CPU int8", [1.0, 1.2, 0.8], cells=6, note="gate passed"),  # 6 cells/s
    ]
    buffer = io.StringIO()
    print_table(Console(file=buffer, width=200), results, flops=43.9)
    rows = [line for line in buffer.getvalue().splitlines() if line.startswith("│")]
    assert "2.00" in rows[0] and "87.8" in rows[0] and "1.00x" in rows[0]
    assert "6.00" in rows[1] and "263.4" in rows[1] and "3.00x" in rows[1]


def test_gemm_shapes_are_the_models_linear_layers_at_the_batch() -> None:
    torch = pytest.importorskip("torch")
    from export.encoder import build_encoder

    with torch.device("meta"):
        small = build_encoder("vit_small")
    shapes = {(s.inner, s.cols): s for s in linear_shapes(small, batch=4)}
    assert set(shapes) == {(384, 1152), (384, 384), (384, 1536), (1536, 384)}
    assert all(s.layers == 12 and s.rows == 4 * 257 for s in shapes.values())


def test_gemm_kernels_compute_the_product_they_are_timed_on() -> None:
    pytest.importorskip("onnxruntime")
    shape = GemmShape(rows=6, inner=16, cols=5, layers=1)
    sessions = _kernel_sessions(shape, threads=1)
    assert tuple(sessions) == KERNELS
    session, feeds, weights = sessions["MatMulInteger u8s8"]
    (product,) = session.run(None, feeds)
    assert np.array_equal(product, feeds["x"].astype(np.int32) @ weights.astype(np.int32))
    session, feeds, weights = sessions["fp32 MatMul"]
    (product,) = session.run(None, feeds)
    assert np.allclose(product, feeds["x"] @ weights, atol=1e-4)
    session, feeds, weights = sessions["DynamicQuantizeMatMul"]
    (product,) = session.run(None, feeds)
    # weight scale 0.01: the fp32 product of the activations with the int8 weights / 100
    relative = np.abs(product - feeds["x"] @ (weights * 0.01)).max() / np.abs(product).max()
    assert relative < 0.02  # the activations' uint8 rounding only
    results = measure_gemm_ceiling([shape], threads=1, repeats=2, warmup=0)
    assert set(results[0].seconds) == set(KERNELS)
    assert all(seconds > 0 for seconds in results[0].seconds.values())


def test_linear_layers_ratio_weights_each_shape_by_its_layer_count() -> None:
    a = GemmResult(GemmShape(8, 4, 4, layers=3), {"fp32 MatMul": 2.0, "MatMulInteger u8s8": 1.0})
    b = GemmResult(GemmShape(8, 4, 2, layers=1), {"fp32 MatMul": 1.0, "MatMulInteger u8s8": 1.0})
    # fp32: 3 x 2 + 1 x 1 = 7 s; int8: 3 x 1 + 1 x 1 = 4 s
    assert linear_layers_ratio([a, b], "MatMulInteger u8s8") == pytest.approx(7 / 4)
    assert a.ratio("MatMulInteger u8s8") == pytest.approx(2.0)


def test_cpu_description_names_the_int8_instruction_sets() -> None:
    text = cpu_description()
    assert "avx512_vnni" in text and ("has:" in text or "unknown" in text)
