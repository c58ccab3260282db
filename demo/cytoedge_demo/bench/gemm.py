"""The int8 GEMM ceiling: ONNX Runtime's int8 kernels vs fp32 MatMul at the encoder's shapes.

An int8 encoder cannot beat fp32 by more than its matrix multiplies do, since the
Linear layers are nearly all of its work. This times, in one process and interleaved,
the three kernels ONNX Runtime's CPU provider picks for a Linear layer: fp32
``MatMul``, ``MatMulInteger`` (uint8 activations x int8 weights, the pure int8
kernel) and ``DynamicQuantizeMatMul`` (what a dynamically quantised model runs
after graph optimisation: quantise the activations, int8 GEMM, rescale).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

KERNELS = ("fp32 MatMul", "MatMulInteger u8s8", "DynamicQuantizeMatMul")
_SEED = 0


@dataclass(frozen=True)
class GemmShape:
    rows: int  # tokens x batch
    inner: int  # Linear in_features
    cols: int  # Linear out_features
    layers: int  # how many Linear layers of the model have this shape

    @property
    def gop(self) -> float:
        return 2.0 * self.rows * self.inner * self.cols / 1e9


@dataclass
class GemmResult:
    shape: GemmShape
    seconds: dict[str, float]  # kernel -> median seconds

    def ratio(self, kernel: str) -> float:
        return self.seconds["fp32 MatMul"] / self.seconds[kernel]


def linear_shapes(model: Any, batch: int, image_size: int = 224) -> list[GemmShape]:
    """The distinct (in, out) shapes of the model's Linear layers at ``batch`` images."""
    from torch import nn

    patch = model.patch_embed.proj
    tokens = (image_size // patch.stride[0]) * (image_size // patch.stride[1])
    tokens += 1 + getattr(model, "num_reg_tokens", 0)
    counts = Counter(
        (module.in_features, module.out_features)
        for module in model.modules()
        if isinstance(module, nn.Linear)
    )
    return [GemmShape(tokens * batch, k, n, layers) for (k, n), layers in counts.items()]


def _kernel_sessions(
    shape: GemmShape, threads: int
) -> dict[str, tuple[Any, dict[str, np.ndarray], np.ndarray]]:
    """Per kernel: a single-node ONNX session, its random activations and its weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(_SEED)
    m, k, n = shape.rows, shape.inner, shape.cols
    w_float = rng.standard_normal((k, n), dtype=np.float32)
    # 7-bit weights (reduce_range's): no int16 saturation in AVX2's vpmaddubsw, so every
    # kernel computes the exact product; the speed does not depend on the values.
    w_int8 = rng.integers(-64, 64, (k, n), dtype=np.int8)
    x_float = rng.standard_normal((m, k), dtype=np.float32)
    x_uint8 = rng.integers(0, 256, (m, k), dtype=np.uint8)

    def graph(node: Any, x_type: int, y_type: int, initialisers: list[Any]) -> Any:
        return helper.make_graph(
            [node],
            "gemm",
            [helper.make_tensor_value_info("x", x_type, [m, k])],
            [helper.make_tensor_value_info("y", y_type, [m, n])],
            initialisers,
        )

    graphs = {
        "fp32 MatMul": (
            graph(
                helper.make_node("MatMul", ["x", "w"], ["y"]),
                TensorProto.FLOAT,
                TensorProto.FLOAT,
                [numpy_helper.from_array(w_float, "w")],
            ),
            x_float,
            w_float,
        ),
        "MatMulInteger u8s8": (
            graph(
                helper.make_node("MatMulInteger", ["x", "w"], ["y"]),
                TensorProto.UINT8,
                TensorProto.INT32,
                [numpy_helper.from_array(w_int8, "w")],
            ),
            x_uint8,
            w_int8,
        ),
        "DynamicQuantizeMatMul": (
            graph(
                helper.make_node(
                    "DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"], domain="com.microsoft"
                ),
                TensorProto.FLOAT,
                TensorProto.FLOAT,
                [
                    numpy_helper.from_array(w_int8, "w"),
                    numpy_helper.from_array(np.full(n, 0.01, np.float32), "s"),
                    numpy_helper.from_array(np.zeros(n, np.int8), "z"),
                ],
            ),
            x_float,
            w_int8,
        ),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    sessions = {}
    for kernel, (g, x, w) in graphs.items():
        model = helper.make_model(g, opset_imports=opsets).SerializeToString()
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        sessions[kernel] = (session, {"x": x}, w)
    return sessions


def measure_gemm_ceiling(
    shapes: list[GemmShape], threads: int, repeats: int = 5, warmup: int = 1
) -> list[GemmResult]:
    """Median seconds per kernel and shape, the kernels interleaved repeat by repeat."""
    results = []
    for shape in shapes:
        sessions = _kernel_sessions(shape, threads)
        for _ in range(warmup):
            for session, feeds, _ in sessions.values():
                session.run(None, feeds)
        seconds: dict[str, list[float]] = {kernel: [] for kernel in sessions}
        for _ in range(repeats):
            for kernel, (session, feeds, _) in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds)
                seconds[kernel].append(time.perf_counter() - start)
        results.append(GemmResult(shape, {k: statistics.median(v) for k, v in seconds.items()}))
    return results


def linear_layers_ratio(results: list[GemmResult], kernel: str) -> float:
    """fp32 over ``kernel`` time for all the model's Linear layers (shapes x layer counts)."""
    fp32 = sum(r.seconds["fp32 MatMul"] * r.shape.layers for r in results)
    return fp32 / sum(r.seconds[kernel] * r.shape.layers for r in results)


def print_gemm_table(out: Console, results: list[GemmResult]) -> None:
    table = Table(title="int8 GEMM ceiling: ORT CPU kernels at the encoder's Linear shapes")
    table.add_column("M x K x N (layers)")
    for kernel in KERNELS:
        table.add_column(f"{kernel} GOP/s (x fp32)")
    for result in results:
        s = result.shape
        table.add_row(
            f"{s.rows} x {s.inner} x {s.cols} ({s.layers})",
            *(f"{s.gop / result.seconds[k]:.1f} ({result.ratio(k):.2f}x)" for k in KERNELS),
        )
    table.add_row(
        "all Linear layers",
        "1.00x",
        *(f"{linear_layers_ratio(results, k):.2f}x" for k in KERNELS[1:]),
    )
    out.print(table)


def cpu_description() -> str:
    """The CPU's model name and which int8-relevant instruction sets it has (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "CPU unknown (no /proc/cpuinfo)"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    present = ", ".join(flag for flag in wanted if flag in flags) or "none"
    absent = ", ".join(flag for flag in wanted if flag not in flags) or "none"
    return f"{fields.get('model name', 'unknown CPU')} (has: {present}; lacks: {absent})"
