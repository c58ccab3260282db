"""ONNX export of the encoder and heads, each behind a parity gate against torch.

Contract (docs/DESIGN.md): encoder ``pixels`` float32 (N, 3, 224, 224), normalised with the
bundle's mean / std -> ``embedding`` (N, D). Heads ``features`` float32 (N, D) ->
``probabilities`` and ``attention`` (N,) (+ ``hemoglobin`` (1,) for the transformer).
A model that fails its gate is never written: the export goes to a temporary folder
beside the target and is moved into place only after the gate passed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.cell_images import cell_pixels
from runtime.parity import (
    ENCODER_MIN_COSINE,
    HEAD_MAX_PROBABILITY_DIFF,
    HEAD_MIN_ATTENTION_COSINE,
    bag_features,
    centred_cosine,
    row_cosines,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from torch import nn

OPSET = 17
DEFAULT_BAG_LENGTHS = (1, 7, 5000)
PROBE_ROWS = (1, 1, 1, 1)  # a patient probe's parity: four embeddings, one at a time
# protobuf caps one file at 2 GB: larger models (ViT-G) keep weights in "<name>.data".
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass
class ParityReport:
    """What a gate measured, the limits it applied and whether every limit held."""

    what: str
    passed: bool
    metrics: dict[str, float] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        numbers = ", ".join(f"{k}={_format(v)}" for k, v in self.metrics.items())
        limits = ", ".join(f"{k} {v}" for k, v in self.limits.items())
        return f"parity {verdict} for {self.what}: {numbers} (limits: {limits})"


class ParityError(RuntimeError):
    """A converted model disagrees with its reference; nothing was written."""

    def __init__(self, report: ParityReport) -> None:
        self.report = report
        super().__init__(report.summary())


def _format(value: float) -> str:
    if value == int(value) and (abs(value) >= 1 or value == 0):
        return str(int(value))
    return f"{value:.3e}" if abs(value) < 1e-3 else f"{value:.9f}"


def ort_session(path: str | Path, threads: int = 0) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- encoder -----------------------------------------------------------------------------


def default_encoder_probe() -> list[np.ndarray]:
    """Batches the encoder gate runs: one cell and a batch of eight (checks the dynamic axis)."""
    return [cell_pixels(1, seed=101), cell_pixels(8, seed=102)]


def embedding_parity(
    what: str, pairs: Iterable[tuple[np.ndarray, np.ndarray]], min_cosine: float
) -> ParityReport:
    """The encoder's gate, for every variant and backend: per-row cosine of a candidate's
    embeddings against its reference's, over (reference, candidate) pairs of probe batches.

    Passes when the lowest cosine reaches ``min_cosine``, the runtime/parity.py limit of
    the candidate's precision; the largest absolute difference and the rows are reported.
    """
    cosines, diffs = [], []
    for reference, candidate in pairs:
        cosines.append(row_cosines(reference, candidate))
        diffs.append(float(np.abs(reference - candidate).max()))
    every_row = np.concatenate(cosines)
    lowest = float(every_row.min())
    return ParityReport(
        what=what,
        passed=lowest >= min_cosine,
        metrics={"min_cosine": lowest, "max_abs_diff": max(diffs), "rows": float(len(every_row))},
        limits={"min_cosine": f">= {min_cosine:.10g}"},  # 10 digits: 0.99989, not ...0001
    )


def encoder_parity(
    model: nn.Module, onnx_path: str | Path, batches: Sequence[np.ndarray] | None = None
) -> ParityReport:
    """fp32 ONNX Runtime vs torch on cell-like images."""
    import torch

    batches = list(batches) if batches is not None else default_encoder_probe()
    session = ort_session(onnx_path)

    def pair(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            reference = model(torch.from_numpy(pixels)).numpy()
        (candidate,) = session.run(["embedding"], {"pixels": pixels})
        return reference, candidate

    return embedding_parity(
        f"encoder {Path(onnx_path).name} (fp32 ONNX vs torch)",
        map(pair, batches),
        ENCODER_MIN_COSINE,
    )


def export_encoder(
    model: nn.Module,
    out_path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    batches: Sequence[np.ndarray] | None = None,
) -> ParityReport:
    """Export ``model`` (eval mode) to ``out_path`` if and only if its parity gate passes."""
    import torch

    model = model.eval()
    # Plain attention (q @ k^T * constant scale, softmax, @ v) instead of torch's fused
    # kernel: the fused op exports with the scale computed from runtime shapes, which
    # the fp16 converter mistypes and TensorRT cannot fold. Same arithmetic.
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    example = torch.from_numpy(cell_pixels(2, seed=100))

    def write(path: Path) -> None:
        traced_export(
            model,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return gated_export(
        write,
        lambda path: encoder_parity(model, path, batches),
        Path(out_path),
        {"cytoedge.model": "encoder", **(metadata or {})},
        external_data=size > _EXTERNAL_DATA_BYTES,
    )


# ---- heads -------------------------------------------------------------------------------


def head_parity(
    members: Sequence[nn.Module],
    onnx_paths: Sequence[str | Path],
    bag_lengths: Sequence[int] = DEFAULT_BAG_LENGTHS,
) -> ParityReport:
    """Every member's ONNX vs torch on bags of the given lengths.

    Probabilities (and hemoglobin) must agree within 1e-4. Attention weights in a long bag
    are of order 1 / N, so they are compared by the cosine of their deviations from the
    uniform 1 / N (a plain cosine of two near-uniform vectors is ~1 whatever they hold).
    """
    import torch

    from export.heads import head_kind, output_names

    names = output_names(head_kind(members[0]))
    attends = "attention" in names
    worst = {"max_probability_diff": 0.0}
    if attends:
        worst |= {"min_attention_cosine": 1.0, "max_attention_diff": 0.0}
    if "hemoglobin" in names:
        worst["max_hemoglobin_diff"] = 0.0
    for index, (member, path) in enumerate(zip(members, onnx_paths, strict=True)):
        session = ort_session(path)
        dim = member.config.in_dim
        for position, length in enumerate(bag_lengths):
            seed = 1000 + 17 * index + length + 101 * position
            features = bag_features(length, dim, seed=seed)
            with torch.no_grad():
                outputs = [t.numpy() for t in member(torch.from_numpy(features))]
            reference = dict(zip(names, outputs, strict=True))
            candidate = dict(
                zip(names, session.run(list(names), {"features": features}), strict=True)
            )
            for name in names:
                if reference[name].shape != candidate[name].shape:
                    raise ParityError(
                        ParityReport(
                            what=f"head {Path(path).name}",
                            passed=False,
                            metrics={"bag_length": float(length)},
                            limits={
                                name: f"shape {reference[name].shape}, got {candidate[name].shape}"
                            },
                        )
                    )
            diff = float(np.abs(reference["probabilities"] - candidate["probabilities"]).max())
            worst["max_probability_diff"] = max(worst["max_probability_diff"], diff)
            if not attends:
                continue
            if length > 1:
                worst["min_attention_cosine"] = min(
                    worst["min_attention_cosine"],
                    centred_cosine(reference["attention"], candidate["attention"]),
                )
            worst["max_attention_diff"] = max(
                worst["max_attention_diff"],
                float(np.abs(reference["attention"] - candidate["attention"]).max()),
            )
            if "hemoglobin" in names:
                worst["max_hemoglobin_diff"] = max(
                    worst["max_hemoglobin_diff"],
                    float(np.abs(reference["hemoglobin"] - candidate["hemoglobin"]).max()),
                )
    passed = (
        worst["max_probability_diff"] <= HEAD_MAX_PROBABILITY_DIFF
        and worst.get("min_attention_cosine", 1.0) >= HEAD_MIN_ATTENTION_COSINE
        and worst.get("max_hemoglobin_diff", 0.0) <= HEAD_MAX_PROBABILITY_DIFF
    )
    limits = {"max_probability_diff": f"<= {HEAD_MAX_PROBABILITY_DIFF}"}
    if attends:
        limits["min_attention_cosine"] = f">= {HEAD_MIN_ATTENTION_COSINE}"
    if "hemoglobin" in names:
        limits["max_hemoglobin_diff"] = f"<= {HEAD_MAX_PROBABILITY_DIFF}"
    lengths = ",".join(str(n) for n in bag_lengths)
    return ParityReport(
        what=f"{len(members)} head member(s), bag lengths {lengths} (fp32 ONNX vs torch)",
        passed=passed,
        metrics=worst,
        limits=limits,
    )


def export_head_member(
    member: nn.Module,
    out_path: str | Path,
    *,
    bag_lengths: Sequence[int] = DEFAULT_BAG_LENGTHS,
    metadata: dict[str, str] | None = None,
) -> ParityReport:
    """Export one ensemble member with a dynamic ``cells`` axis, behind its parity gate."""
    import torch

    from export.heads import head_config, head_kind, output_names

    member = member.eval()
    kind = head_kind(member)
    names = output_names(kind)
    bag = "attention" in names  # a MIL head: any number of cells; a probe: one embedding
    # trace a bag with 7 cells so that no size-1 dimension gets specialised
    example = torch.from_numpy(bag_features(7 if bag else 1, member.config.in_dim, seed=7))
    if not bag:
        bag_lengths = PROBE_ROWS

    def write(path: Path) -> None:
        traced_export(
            member,
            (example,),
            str(path),
            input_names=["features"],
            output_names=list(names),
            dynamic_axes={"features": {0: "cells"}, "attention": {0: "cells"}} if bag else None,
            opset_version=OPSET,
            dynamo=False,
        )

    info = {
        "cytoedge.model": "head",
        "cytoedge.head_kind": kind,
        "cytoedge.head_config": json.dumps(head_config(member)),
        **(metadata or {}),
    }
    return gated_export(
        write, lambda path: head_parity([member], [path], bag_lengths), Path(out_path), info
    )


def export_heads(
    members: Sequence[nn.Module],
    out_dir: str | Path,
    name: str,
    *,
    bag_lengths: Sequence[int] = DEFAULT_BAG_LENGTHS,
) -> tuple[list[Path], list[ParityReport]]:
    """One ONNX file per member, ``<out_dir>/<name>.<k>.onnx`` (the bundle's layout)."""
    out_dir = Path(out_dir)
    paths, reports = [], []
    for index, member in enumerate(members):
        path = out_dir / f"{name}.{index}.onnx"
        reports.append(
            export_head_member(
                member,
                path,
                bag_lengths=bag_lengths,
                metadata={"cytoedge.ensemble_member": f"{index}/{len(members)}"},
            )
        )
        paths.append(path)
    return paths, reports


# ---- shared ------------------------------------------------------------------------------


def traced_export(*args: object, **kwargs: object) -> None:
    """``torch.onnx.export`` without its TracerWarnings: the tracer warns about every
    Python-side branch on a tensor (timm's shape asserts, the attention mask test),
    which the parity gate after it checks for real on several batch and bag sizes."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(*args, **kwargs)


def gated_export(
    write: Callable[[Path], None],
    check: Callable[[Path], ParityReport],
    out_path: Path,
    metadata: dict[str, str],
    *,
    external_data: bool = False,
) -> ParityReport:
    """Write into a temporary folder beside ``out_path``; move into place only on a pass."""
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        raw = staging / "raw" / out_path.name
        raw.parent.mkdir()
        write(raw)
        model = onnx.load(str(raw))
        merged = {entry.key: entry.value for entry in model.metadata_props} | metadata
        del model.metadata_props[:]
        for key, value in merged.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        staged = staging / out_path.name
        data_name = f"{out_path.name}.data"
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=external_data,
            all_tensors_to_one_file=True,
            location=data_name,
        )
        onnx.checker.check_model(str(staged))
        report = check(staged)
        if not report.passed:
            raise ParityError(report)
        if external_data:
            shutil.move(str(staging / data_name), out_path.parent / data_name)
        staged.replace(out_path)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
