"""int8 ONNX of the encoder for CPU-only sites, accepted only if it keeps fidelity.

Dynamic quantisation (ONNX Runtime, QInt8 weights per output channel, uint8
activations, after ORT's ``quant_pre_process`` so every Linear is quantised, with the
attention blocks fused to ORT's Attention op so that they become QAttention, see
export/attention_fusion.py) is tried first; static QDQ calibrated
on cell patches only if dynamic fails. A candidate is accepted when, on rendered cell
images (not noise), every embedding keeps cosine >= 0.99 against fp32 AND every head
given makes the same calls on bags of those cells. Otherwise nothing is written and the
result says why, so the bundle keeps fp32 and records the reason.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.attention_fusion import fuse_attention
from export.cell_images import cell_pixels
from export.onnx_export import embedding_parity, ort_session
from runtime.parity import INT8_MIN_COSINE, row_cosines

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

GATE_CELLS = 48  # 3 bags of 16 cells
BAG_SIZE = 16
CALIBRATION_BATCHES = 2  # x 8 cells, seeds the gate never sees


@dataclass(frozen=True)
class HeadProbe:
    """A head whose calls must not change: its member ONNX files and decision rule.

    gated_attention_mil: a task is called positive at probability >= its threshold
    (0.5 when none is given). transformer_mil: the call is the top class.
    """

    name: str
    kind: str
    files: tuple[Path, ...]
    thresholds: dict[str, float] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()


@dataclass
class Int8Result:
    accepted: bool
    reason: str  # one line for the bundle's int8_note
    method: str | None = None  # "dynamic" or "static-qdq" when accepted
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


def quantize_encoder(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    heads: Sequence[HeadProbe] = (),
    pixels: np.ndarray | None = None,
) -> Int8Result:
    """Try dynamic, then static int8; write ``out_path`` only for an accepted model."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    pixels = pixels if pixels is not None else cell_pixels(GATE_CELLS, seed=2024)
    (reference,) = ort_session(fp32_path).run(["embedding"], {"pixels": pixels})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    failures = []
    try:
        # Fused before ORT's pre-processing, which reorders the chain the fusion matches.
        fused = staging / "fused.onnx"
        fused_blocks = _fused_attention(fp32_path, fused)
        prepared = staging / "prepared.onnx"
        quant_pre_process(str(fused if fused_blocks else fp32_path), str(prepared))

        def prepared_unfused() -> Path:
            if not fused_blocks:
                return prepared
            unfused = staging / "prepared-unfused.onnx"
            quant_pre_process(str(fp32_path), str(unfused))
            return unfused

        candidates = {
            "dynamic": lambda path: quantize_dynamic(
                str(prepared),
                str(path),
                weight_type=QuantType.QInt8,
                per_channel=True,
                # shape inference cannot type the fused Attention's output
                extra_options={"DefaultTensorType": TensorProto.FLOAT},
            ),
            # static QDQ has no Attention: it quantises the plain graph
            "static-qdq": lambda path: _quantize_static(prepared_unfused(), path),
        }
        for method, quantise in candidates.items():
            candidate = staging / f"{method}.onnx"
            quantise(candidate)
            (embeddings,) = ort_session(candidate).run(["embedding"], {"pixels": pixels})
            verdict = judge_int8(f"encoder {method} int8", reference, embeddings, heads)
            metrics = verdict.metrics
            if verdict.passed:
                shutil.move(str(candidate), out_path)
                if method == "dynamic" and fused_blocks:
                    metrics["qattention_blocks"] = float(fused_blocks)
                return Int8Result(
                    True, f"{method} int8 accepted: {verdict.summary}", method, metrics, out_path
                )
            failures.append(f"{method}: {verdict.summary}")
        return Int8Result(
            False,
            "int8 rejected, bundle keeps fp32: " + " | ".join(failures),
            None,
            metrics,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Int8Verdict:
    """One int8 candidate against the fp32 reference: passed, its figures, one line."""

    passed: bool
    metrics: dict[str, float]
    summary: str


def judge_int8(
    label: str, reference: np.ndarray, embeddings: np.ndarray, heads: Sequence[HeadProbe] = ()
) -> Int8Verdict:
    """The int8 gate, whatever made the candidate: every embedding of the rendered cells
    keeps cosine >= INT8_MIN_COSINE against fp32, and no head's call changes."""
    report = embedding_parity(f"{label} vs fp32 ONNX", [(reference, embeddings)], INT8_MIN_COSINE)
    metrics = {**report.metrics, **_cell_to_cell(reference, embeddings)}
    changed = [
        f"{probe.name} ({n} calls changed)"
        for probe in heads
        if (n := _changed(_calls(probe, reference), _calls(probe, embeddings)))
    ]
    metrics["head_calls_changed"] = float(len(changed))
    if report.passed and not changed:
        checked = ", ".join(p.name for p in heads) or "none given"
        summary = (
            f"min cosine {metrics['min_cosine']:.5f} vs fp32 on {len(reference)} rendered "
            f"cells (>= {INT8_MIN_COSINE}); head calls unchanged (heads checked: {checked})"
        )
        return Int8Verdict(True, metrics, summary)
    summary = f"min cosine {metrics['min_cosine']:.5f}"
    if changed:
        summary += f", {'; '.join(changed)}"
    return Int8Verdict(False, metrics, summary)


def _fused_attention(fp32_path: Path, out_path: Path) -> int:
    """Write the model with its attention blocks as fused Attention (see attention_fusion).

    Dynamic quantisation turns those into QAttention. Returns the number of blocks
    fused; 0 (nothing written) when none matches or the weights are stored externally.
    """
    import onnx

    if any(
        init.data_location == onnx.TensorProto.EXTERNAL
        for init in onnx.load(str(fp32_path), load_external_data=False).graph.initializer
    ):
        return 0
    model = onnx.load(str(fp32_path))
    blocks = fuse_attention(model)
    if blocks:
        onnx.save(model, str(out_path))
    return blocks


def _quantize_static(prepared: Path, out_path: Path) -> None:
    batches = [cell_pixels(8, seed=3000 + i) for i in range(CALIBRATION_BATCHES)]
    quantize_static_qdq(prepared, out_path, "pixels", batches)  # cells the gate does not see


def quantize_static_qdq(
    prepared: Path,
    out_path: Path,
    input_name: str,
    calibration: Sequence[np.ndarray],
    **options: object,
) -> None:
    """Static QDQ int8 (per-channel int8 weights, uint8 activations) with MinMax ranges
    from ``calibration``, each array one feed of ``input_name``; ``options`` go to
    ``quantize_static`` (op types, excluded nodes)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[np.ndarray] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._feeds, None)
            return None if x is None else {input_name: x}

    quantize_static(
        str(prepared),
        str(out_path),
        Feeds(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        **options,  # type: ignore[arg-type]
    )


def _cell_to_cell(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """What a high min cosine can hide: the mean row cosine, and the lowest cosine once the
    mean embedding is removed from both (the part that tells cells apart, docs/export.md)."""
    mean = reference.mean(0, keepdims=True)
    return {
        "mean_cosine": float(row_cosines(reference, candidate).mean()),
        "min_centred_cosine": float(row_cosines(reference - mean, candidate - mean).min()),
    }


def _calls(probe: HeadProbe, embeddings: np.ndarray) -> list[tuple[str, ...]]:
    """The head's calls on consecutive bags of BAG_SIZE cells (members averaged)."""
    sessions = [ort_session(path) for path in probe.files]
    calls = []
    for start in range(0, len(embeddings), BAG_SIZE):
        bag = np.ascontiguousarray(embeddings[start : start + BAG_SIZE], dtype=np.float32)
        probabilities = np.mean(
            [s.run(["probabilities"], {"features": bag})[0] for s in sessions], axis=0
        )
        outputs = probe.outputs or tuple(str(i) for i in range(len(probabilities)))
        if probe.kind == "gated_attention_mil":
            calls.append(
                tuple(
                    "positive" if p >= probe.thresholds.get(name, 0.5) else "negative"
                    for name, p in zip(outputs, probabilities, strict=True)
                )
            )
        else:
            calls.append((outputs[int(np.argmax(probabilities))],))
    return calls


def _changed(before: list[tuple[str, ...]], after: list[tuple[str, ...]]) -> int:
    return sum(
        a != b
        for bag_a, bag_b in zip(before, after, strict=True)
        for a, b in zip(bag_a, bag_b, strict=True)
    )
