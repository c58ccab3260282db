"""fp16 TensorRT engines for a bundle, each behind a parity gate against fp32 ONNX.

The build itself (optimisation profiles encoder 1/64/256 and heads 1/512/20,000, FP16
with LayerNorm / Softmax layers pinned to fp32 under OBEY_PRECISION_CONSTRAINTS, timing
cache, the engine's JSON sidecar keyed by ONNX sha256 + GPU name + compute capability +
TensorRT version) lives in ``runtime.engines`` so that a site can rebuild a stale engine
without torch; this module drives it for ``cytoedge export engines`` and adds the gate:

- encoder: embeddings of rendered cell images keep cosine >= 0.999 against fp32 ONNX;
- heads: identical calls on test bags (thresholds from the bundle; top class for a
  transformer head), probability differences reported.

An engine that fails its gate is deleted with its sidecar, so it is never loaded.
TensorRT is imported lazily: without it (or without a GPU) a clear error says so.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.cell_images import cell_pixels
from export.crop_input import CROPS_INPUT, render_crops
from export.onnx_export import ParityError, ParityReport, embedding_parity, ort_session
from runtime.parity import FP16_MIN_COSINE, bag_features

if TYPE_CHECKING:
    from collections.abc import Sequence

MIN_TENSORRT_MAJOR = 10
GATE_BAG_LENGTHS = (1, 7, 512, 5000)


class TensorRTUnavailableError(RuntimeError):
    """TensorRT >= 10 or a CUDA GPU is missing on this machine."""


def require_tensorrt() -> str:
    """The installed TensorRT version; raises TensorRTUnavailableError with the reason."""
    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailableError(
            "TensorRT is not installed (pip install 'cytoedge[gpu]' on a machine with an "
            "NVIDIA GPU); the bundle's ONNX files still run on ONNX Runtime"
        )
    import tensorrt as trt

    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(f"TensorRT {trt.__version__} is too old (need >= 10)")
    from runtime.backends.cuda import device_identity

    try:
        device_identity()
    except Exception as error:  # no driver, no device, no cuda-python: one message
        raise TensorRTUnavailableError(f"no usable CUDA GPU: {error}") from error
    return str(trt.__version__)


@dataclass(frozen=True)
class EngineTarget:
    """One ONNX file of a bundle to build: the encoder, or one member of a head."""

    onnx_path: Path
    role: str  # "encoder" or "head"
    head_kind: str = ""
    outputs: tuple[str, ...] = ()
    thresholds: dict[str, float] | None = None


def build_checked_engine(target: EngineTarget, engines_dir: Path) -> tuple[Path, ParityReport]:
    """Build (or reuse a current) engine for ``target`` and gate it; ParityError on failure."""
    require_tensorrt()
    from runtime.backends.trt import TensorrtBackend
    from runtime.engines import ensure_engine, sidecar_path

    engine_path = ensure_engine(target.onnx_path, engines_dir)
    engine = TensorrtBackend(target.onnx_path, engine_path)
    reference = ort_session(target.onnx_path)
    if target.role == "encoder":
        report = encoder_engine_parity(engine, reference, target.onnx_path.name)
    else:
        report = head_engine_parity(engine, reference, target)
    if not report.passed:
        engine_path.unlink(missing_ok=True)
        sidecar_path(engine_path).unlink(missing_ok=True)
        raise ParityError(report)
    return engine_path, report


def encoder_engine_parity(engine: object, reference: object, name: str) -> ParityReport:
    """Engine vs fp32 ONNX Runtime on rendered cells, batches of 1 and 64 (the opt batch)."""
    [network_input] = reference.get_inputs()

    def pair(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if network_input.name == CROPS_INPUT:  # a folded encoder takes the uint8 crops
            feeds = {CROPS_INPUT: render_crops(count, network_input.shape[1], seed)}
        else:
            feeds = {"pixels": cell_pixels(count, seed)}
        (expected,) = reference.run(["embedding"], feeds)
        return expected, engine.run(feeds)["embedding"].astype(np.float32)

    return embedding_parity(
        f"TensorRT fp16 engine for {name} vs fp32 ONNX",
        (pair(count, seed) for count, seed in ((1, 501), (64, 502))),
        FP16_MIN_COSINE,
    )


def head_engine_parity(
    engine: object,
    reference: object,
    target: EngineTarget,
    bag_lengths: Sequence[int] = GATE_BAG_LENGTHS,
) -> ParityReport:
    """Identical calls on bags of the given lengths; probability differences reported."""
    dim = int(engine.inputs[0].shape[1])
    changed, worst = 0, 0.0
    for length in bag_lengths:
        features = bag_features(length, dim, seed=9000 + length)
        (expected,) = reference.run(["probabilities"], {"features": features})
        got = engine.run({"features": features})["probabilities"].astype(np.float32)
        worst = max(worst, float(np.abs(expected - got).max()))
        changed += int(_calls(target, expected) != _calls(target, got))
    return ParityReport(
        what=f"TensorRT fp16 engine for {target.onnx_path.name} vs fp32 ONNX",
        passed=changed == 0,
        metrics={"bags_with_changed_calls": float(changed), "max_probability_diff": worst},
        limits={"bags_with_changed_calls": "== 0"},
    )


def _calls(target: EngineTarget, probabilities: np.ndarray) -> tuple[object, ...]:
    if target.head_kind == "transformer_mil":
        return (int(np.argmax(probabilities)),)
    thresholds = target.thresholds or {}
    names = target.outputs or tuple(str(i) for i in range(len(probabilities)))
    return tuple(
        bool(p >= thresholds.get(name, 0.5)) for name, p in zip(names, probabilities, strict=True)
    )


def bundle_targets(bundle_path: Path) -> list[EngineTarget]:
    """Every ONNX file of a bundle that gets an engine: the fp32 encoder and all head members."""
    from runtime.bundle_format import load_bundle

    bundle = load_bundle(bundle_path)
    targets = [EngineTarget(bundle.file(bundle.encoder.variants["fp32"]), "encoder")]
    for head in bundle.heads:
        for file in head.files:
            targets.append(
                EngineTarget(
                    bundle.file(file), "head", head.kind, head.outputs, dict(head.thresholds)
                )
            )
    return targets
