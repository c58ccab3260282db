"""``cytoedge bench encoder``: one fixed batch of cell images through every encoder path.

Paths, in one run on the same images: torch eager fp32 (the baseline), torch bf16
autocast (the strongest torch CPU baseline, docs/ENVIRONMENT.md), ONNX Runtime fp32
and int8 on the CPU through the runtime's own backend, OpenVINO on the fp32 ONNX at
each precision this CPU runs (bf16 with AMX or AVX-512 bf16, f32) and on NNCF's static
int8 (export/int8_static.py) when it passes its gate, and where present ORT-CUDA
fp16 and TensorRT fp16 (plus torch CUDA fp16 autocast as the GPU baseline). Prints
cells/s, GFLOP/s and the ratio to torch eager fp32, and the int8 fidelity gate.

GFLOP per cell is counted from the model itself: 2 x tokens x (in x out) for every
Linear layer plus the patch-embedding convolution, which gives 43.9 for ViT-B/14
at 224 px (the torch flop counter's figure); attention's score and value matmuls
(2.4 GFLOP more for ViT-B) are left out, as that figure leaves them out.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

IMAGE_SEED = 0
MODEL_SEED = 0


@dataclass
class PathResult:
    name: str
    seconds: list[float]  # one per timed repeat of the whole batch
    cells: int
    note: str = ""

    @property
    def cells_per_second(self) -> float:
        return self.cells / statistics.median(self.seconds)


def gflop_per_cell(model: Any, image_size: int = 224) -> float:
    """Linear and patch-embedding multiply-adds x 2 for one image (see the module doc)."""
    from torch import nn

    patch = model.patch_embed.proj
    grid = (image_size // patch.stride[0]) * (image_size // patch.stride[1])
    tokens = grid + 1 + getattr(model, "num_reg_tokens", 0)
    flops = 2.0 * grid * patch.out_channels * patch.in_channels * patch.kernel_size[0] ** 2
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops += 2.0 * tokens * module.in_features * module.out_features
    return flops / 1e9


def cell_batch(batch: int, size: int = 224) -> np.ndarray:
    """The bench's fixed batch: rendered nucleated cells (export.probe_cells), uint8 NHWC."""
    from export.probe_cells import render_cell_patches

    return render_cell_patches(batch, seed=IMAGE_SEED, size=size)


def normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def time_path(
    name: str, run: Callable[[], Any], cells: int, repeats: int, warmup: int, note: str = ""
) -> PathResult:
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return PathResult(name, seconds, cells, note)


def run_encoder_bench(
    arch: str = "vit_base",
    batch: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 0,
    weights: Path | None = None,
    checkpoint_format: str = "dinobloom",
    workdir: Path | None = None,
    console: Console | None = None,
    gemm: bool = True,
) -> list[PathResult]:
    """Measure every available path on the same batch and print the table.

    With ``gemm``, then also the int8 GEMM ceiling at the model's Linear shapes
    (bench/gemm.py), which bounds what the int8 row can reach on this CPU.
    """
    import os

    import torch

    from cytoedge_demo.builder import demo_encoder
    from export.encoder import MEAN, STD, load_encoder
    from export.onnx_export import export_encoder
    from runtime.backends import ModelVariants, RuntimeSettings, open_model, plan_backends
    from runtime.parity import row_cosines

    out = console or Console()
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="cytoedge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        model = load_encoder(weights, arch, checkpoint_format)  # type: ignore[arg-type]
        origin = f"weights {weights}"
    else:
        # LayerScale in [0.2, 1] so every block matters (timm's 1e-5 makes a near-identity).
        model = demo_encoder(arch, MODEL_SEED)
        origin = f"seeded random weights (seed {MODEL_SEED})"
    flops = gflop_per_cell(model)
    images = cell_batch(batch)
    pixels = normalise(images, MEAN, STD)
    out.print(
        f"Encoder bench: {arch}, {origin}, batch {batch} rendered cells, {repeats} timed "
        f"repeats after {warmup} warm-up, {threads} threads, {flops:.1f} GFLOP/cell"
    )

    fp32 = work / "encoder.onnx"
    with out.status("Exporting fp32 ONNX (with its parity gate)..."):
        report = export_encoder(model, fp32)
    out.print(report.summary())
    results: list[PathResult] = []
    tensor = torch.from_numpy(pixels)
    with torch.inference_mode():
        reference = model(tensor).numpy()
        results.append(time_path("torch eager fp32", lambda: model(tensor), batch, repeats, warmup))

        def bf16() -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(tensor)

        results.append(time_path("torch eager bf16 autocast", bf16, batch, repeats, warmup))

    cpu = open_model(fp32, RuntimeSettings("ort-cpu", threads))
    results.append(
        time_path("ORT CPU fp32", lambda: cpu.run({"pixels": pixels}), batch, repeats, warmup)
    )
    cpu.close()

    from export.int8 import quantize_encoder

    with out.status("Quantising to int8 and running its fidelity gate..."):
        outcome = quantize_encoder(fp32, work / "encoder.int8.onnx")
    out.print(f"int8 gate: {outcome.reason}")
    if outcome.accepted and outcome.path is not None:
        int8 = open_model(outcome.path, RuntimeSettings("ort-cpu", threads))
        batch_cosine = float(
            row_cosines(reference, int8.run({"pixels": pixels})["embedding"]).min()
        )
        results.append(
            time_path(
                "ORT CPU int8",
                lambda: int8.run({"pixels": pixels}),
                batch,
                repeats,
                warmup,
                note=f"gate passed; min cosine on this batch {batch_cosine:.5f}",
            )
        )
        int8.close()

    candidates, _ = plan_backends("auto")
    if "openvino" in candidates:
        from export.int8_static import quantize_encoder_static
        from runtime.backends import backend_class

        with out.status("Quantising to static int8 with NNCF and running its gate..."):
            static = quantize_encoder_static(fp32, work / "encoder.int8-static.onnx")
        out.print(f"int8-static gate: {static.reason}")
        variants = ModelVariants(fp32, int8_static=static.path if static.accepted else None)
        for precision in backend_class("openvino").precisions(variants):
            settings = RuntimeSettings("openvino", threads, precision=precision)
            with out.status(f"Compiling for OpenVINO at {precision}..."):
                vino = open_model(variants, settings, engine_dir=work / "engines")
            vino_cosine = float(
                row_cosines(reference, vino.run({"pixels": pixels})["embedding"]).min()
            )
            source = "NNCF static int8 ONNX" if precision == "int8" else "fp32 ONNX"
            results.append(
                time_path(
                    f"OpenVINO {precision} ({source})",
                    lambda vino=vino: vino.run({"pixels": pixels}),
                    batch,
                    repeats,
                    warmup,
                    note=f"min cosine vs torch fp32 {vino_cosine:.5f}",
                )
            )
            vino.close()
    if torch.cuda.is_available():
        gpu_model = model.cuda()
        gpu_tensor = tensor.cuda()

        def torch_gpu() -> Any:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                result = gpu_model(gpu_tensor)
            torch.cuda.synchronize()
            return result

        results.append(time_path("torch CUDA fp16 autocast", torch_gpu, batch, repeats, warmup))
    if "ort-cuda" in candidates:
        from export.fp16 import convert_to_fp16

        fp16 = work / "encoder.fp16.onnx"
        convert_to_fp16(fp32, fp16)
        cuda = open_model(ModelVariants(fp32, fp16=fp16), RuntimeSettings("ort-cuda"))
        results.append(
            time_path("ORT CUDA fp16", lambda: cuda.run({"pixels": pixels}), batch, repeats, warmup)
        )
        cuda.close()
    if "tensorrt" in candidates:
        with out.status("Building the TensorRT fp16 engine (minutes)..."):
            engine = open_model(fp32, RuntimeSettings("tensorrt"), engine_dir=work / "engines")
        trt_cosine = float(
            row_cosines(reference, engine.run({"pixels": pixels})["embedding"]).min()
        )
        results.append(
            time_path(
                "TensorRT fp16",
                lambda: engine.run({"pixels": pixels}),
                batch,
                repeats,
                warmup,
                note=f"min cosine vs torch fp32 {trt_cosine:.5f}",
            )
        )
        engine.close()
    print_table(out, results, flops)
    if gemm:
        from cytoedge_demo.bench.gemm import (
            cpu_description,
            linear_shapes,
            measure_gemm_ceiling,
            print_gemm_table,
        )

        with out.status("Timing fp32 vs int8 GEMM kernels at the model's shapes..."):
            kernels = measure_gemm_ceiling(linear_shapes(model, batch), threads)
        out.print(cpu_description())
        print_gemm_table(out, kernels)
    return results


def print_table(out: Console, results: list[PathResult], flops: float) -> None:
    baseline = results[0].cells_per_second
    table = Table(title="Encoder throughput (median of the timed repeats)")
    for column in ("path", "cells/s", "GFLOP/s", "x torch eager fp32", "s/batch", "note"):
        table.add_column(column)
    for result in results:
        rate = result.cells_per_second
        table.add_row(
            result.name,
            f"{rate:.2f}",
            f"{rate * flops:.1f}",
            f"{rate / baseline:.2f}x",
            f"{statistics.median(result.seconds):.3f}",
            result.note,
        )
    out.print(table)
