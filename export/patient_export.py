"""ONNX of a patient encoder, behind the encoder's gates, and its ``export.json``.

Contract: ``features`` float32 (cells, cell_dim), any number of cells -> ``embedding``
float32 (1, out_dim). The fp32 file is accepted when every probe bag's embedding keeps
cosine >= ENCODER_MIN_COSINE against torch. The reduced variants are the encoder's, held
to the encoder's limits against fp32 on one further set of bags: fp16 (export/fp16.py's
conversion, for ONNX Runtime's CUDA provider) when it keeps FP16_MIN_COSINE, int8 (ONNX
Runtime dynamic quantisation, for CPUs) when it keeps INT8_MIN_COSINE. A variant that
misses is no failure: the bundle keeps the others and a note says why there is none.
The probes are embedding-like bags (runtime.parity.bag_features) of 1, 7 and 300 cells:
one cell, an odd count, and a long bag.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.fp16 import export_fp16
from export.onnx_export import (
    OPSET,
    ParityError,
    ParityReport,
    embedding_parity,
    gated_export,
    ort_session,
    traced_export,
)
from runtime.parity import ENCODER_MIN_COSINE, FP16_MIN_COSINE, INT8_MIN_COSINE, bag_features

if TYPE_CHECKING:
    from collections.abc import Sequence

    from export.patient_encoder import PatientEncoder

MODEL = "patient_encoder"  # the files' cytoedge.model
FP32_FILE = "patient_encoder.onnx"
FP16_FILE = "patient_encoder.fp16.onnx"
INT8_FILE = "patient_encoder.int8.onnx"
PROBE_LENGTHS = (1, 7, 300)
VARIANT_PROBE_SEED = 57  # the fp16 and int8 gates' bags, other than the fp32 gate's
# Longer bags are evenly thinned to this many cells before the network: attention is
# quadratic in the cells, and GenBloom's own bags are hundreds of cells.
DEFAULT_MAX_CELLS = 2000


def probe_bags(cell_dim: int, seed: int = 31) -> list[np.ndarray]:
    return [bag_features(n, cell_dim, seed=seed + n) for n in PROBE_LENGTHS]


def patient_parity(model: PatientEncoder, onnx_path: Path) -> ParityReport:
    """fp32 ONNX Runtime vs torch, per probe bag."""
    import torch

    session = ort_session(onnx_path)
    cell_dim = model.patch_embed["project"].in_features

    def pair(bag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            reference = model(torch.from_numpy(bag)).numpy()
        return reference, session.run(["embedding"], {"features": bag})[0]

    return embedding_parity(
        f"patient encoder {onnx_path.name} (fp32 ONNX vs torch, bags {PROBE_LENGTHS})",
        map(pair, probe_bags(cell_dim)),
        ENCODER_MIN_COSINE,
    )


def export_fp32(model: PatientEncoder, out_path: Path, metadata: dict[str, str]) -> ParityReport:
    """Write ``out_path`` if and only if its gate passes; raises ParityError otherwise."""
    import torch

    cell_dim = model.patch_embed["project"].in_features
    # traced with 7 cells so that no size-1 dimension gets specialised
    example = torch.from_numpy(bag_features(7, cell_dim, seed=7))

    def write(path: Path) -> None:
        traced_export(
            model,
            (example,),
            str(path),
            input_names=["features"],
            output_names=["embedding"],
            dynamic_axes={"features": {0: "cells"}},
            opset_version=OPSET,
            dynamo=False,
        )

    return gated_export(
        write,
        lambda path: patient_parity(model, path),
        out_path,
        {"cytoedge.model": MODEL, **metadata},
    )


@dataclass
class VariantOutcome:
    """A reduced variant's gate: a miss is no error, the bundle keeps the other variants."""

    accepted: bool
    note: str  # one line for the section's fp16_note or int8_note
    metrics: dict[str, float] = field(default_factory=dict)


def convert_fp16(fp32_path: Path, out_path: Path, cell_dim: int) -> VariantOutcome:
    """fp16 for GPU sites, the encoder's conversion and gate; written only if it passes."""
    bags = probe_bags(cell_dim, seed=VARIANT_PROBE_SEED)
    try:
        report = export_fp16(fp32_path, out_path, bags, input_name="features", model=MODEL)
    except ParityError as error:
        report = error.report
    numbers = _gate_numbers(report)
    if not report.passed:
        return VariantOutcome(
            False, f"fp16 rejected: {numbers} (< {FP16_MIN_COSINE})", report.metrics
        )
    return VariantOutcome(True, f"fp16 accepted: {numbers}, run on a CPU", report.metrics)


def quantize_int8(fp32_path: Path, out_path: Path, cell_dim: int) -> VariantOutcome:
    """Dynamic int8 (QInt8 weights per channel); written only if the gate passes."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    bags = probe_bags(cell_dim, seed=VARIANT_PROBE_SEED)
    reference = ort_session(fp32_path)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        prepared, candidate = staging / "prepared.onnx", staging / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_dynamic(
            str(prepared), str(candidate), weight_type=QuantType.QInt8, per_channel=True
        )
        session = ort_session(candidate)
        report = embedding_parity(
            "patient encoder int8 vs fp32 ONNX",
            (
                (
                    reference.run(["embedding"], {"features": bag})[0],
                    session.run(["embedding"], {"features": bag})[0],
                )
                for bag in bags
            ),
            INT8_MIN_COSINE,
        )
        numbers = _gate_numbers(report)
        if not report.passed:
            return VariantOutcome(
                False, f"int8 rejected: {numbers} (< {INT8_MIN_COSINE})", report.metrics
            )
        shutil.move(str(candidate), out_path)
        return VariantOutcome(True, f"int8 (dynamic) accepted: {numbers}", report.metrics)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gate_numbers(report: ParityReport) -> str:
    return f"min cosine {report.metrics['min_cosine']:.7f} on bags {PROBE_LENGTHS}"


def export_document(
    *,
    kind: str,
    output: str,
    cell_dim: int,
    out_dim: int,
    encoder: dict[str, Any],
    variants: dict[str, str],
    fp16_note: str,
    int8_note: str,
    max_cells: int,
    parity: dict[str, Any],
    source_weights: Sequence[Path],
) -> dict[str, Any]:
    """``export.json``: the bundle's ``patient_encoder`` section, the gates and provenance."""
    from export.documents import exporter_versions
    from runtime.files import sha256_file

    return {
        "kind": "patient_encoder",
        "section": {
            "kind": kind,
            "output": output,
            "cell_dim": cell_dim,
            "embed_dim": out_dim,
            "encoder": encoder,
            "variants": variants,
            "max_cells": max_cells,
            "fp16_note": fp16_note,
            "int8_note": int8_note,
        },
        "parity": parity,
        "provenance": {
            "source_weights": [{"file": p.name, "sha256": sha256_file(p)} for p in source_weights],
            "embedding": "CLS token after the final LayerNorm"
            + (", projected and L2-normalised" if output == "projection" else ""),
            "exporter": exporter_versions(),
        },
    }
