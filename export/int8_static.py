"""Static int8 of the encoder made by NNCF, OpenVINO's own post-training quantiser, for
the ``openvino`` backend (``encoder.int8-static.onnx``, the bundle's ``int8_static``).

ONNX Runtime's dynamic int8 (export/int8.py) is the right file for ONNX Runtime, but
OpenVINO runs it slower than fp32: it wants weights and activations quantised ahead of
time, as QuantizeLinear/DequantizeLinear pairs it fuses into int8 kernels (VNNI, AMX).
NNCF writes exactly that from the fp32 ONNX, calibrated on rendered cells the gate never
sees, with its transformer scheme (SmoothQuant, then fast bias correction). The result
is held to the int8 gate (``export.int8.judge_int8``) run through OpenVINO itself, at
f32 for everything left unquantised, so the figure measures the quantisation alone.
Whether it is used on a machine is decided there: ``cytoedge doctor --self-test`` keeps
it only where it is the fastest path that passes the same gate on that CPU.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.cell_images import cell_pixels
from export.int8 import GATE_CELLS, Int8Result, judge_int8
from export.onnx_export import ort_session

if TYPE_CHECKING:
    from collections.abc import Sequence

    from export.int8 import HeadProbe

CALIBRATION_BATCHES = 4  # x 8 cells, seeds neither the gate nor export/int8.py uses
INPUT = "pixels"


def quantize_encoder_static(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    heads: Sequence[HeadProbe] = (),
    pixels: np.ndarray | None = None,
) -> Int8Result:
    """NNCF static int8 of ``fp32_path``; ``out_path`` is written only if it passes."""
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    try:
        import nncf  # noqa: F401  (both are the export extra's; say so rather than fail)
        import openvino  # noqa: F401
    except ImportError as missing:
        return Int8Result(False, f"int8-static not tried: {missing.name} is not installed")
    pixels = pixels if pixels is not None else cell_pixels(GATE_CELLS, seed=2024)
    (reference,) = ort_session(fp32_path).run(["embedding"], {INPUT: pixels})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        candidate = staging / out_path.name
        try:
            _quantize(fp32_path, candidate)
        except Exception as error:  # NNCF raises from many layers; the bundle keeps the rest
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            reason = f"{type(error).__name__}: {first_line}".rstrip(": ")
            return Int8Result(False, f"int8-static rejected: NNCF could not quantise: {reason}")
        verdict = judge_int8(
            "encoder NNCF static int8 (OpenVINO)", reference, _run(candidate, pixels), heads
        )
        if not verdict.passed:
            return Int8Result(
                False, f"int8-static rejected: {verdict.summary}", None, verdict.metrics
            )
        shutil.move(str(candidate), out_path)
        return Int8Result(
            True,
            f"int8-static (NNCF) accepted for openvino: {verdict.summary}",
            "nncf-static",
            verdict.metrics,
            out_path,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quantize(fp32_path: Path, out_path: Path) -> None:
    import nncf
    import onnx

    batches = [cell_pixels(8, seed=5000 + i) for i in range(CALIBRATION_BATCHES)]
    quantised = nncf.quantize(
        onnx.load(str(fp32_path)),
        nncf.Dataset(batches, lambda batch: {INPUT: batch}),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(batches),
    )
    onnx.save(quantised, str(out_path))


def _run(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The embeddings OpenVINO gives for ``pixels``, its unquantised parts at f32."""
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled({INPUT: pixels})[compiled.output("embedding")])
