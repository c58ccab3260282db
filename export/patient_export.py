"""ONNX of a patient encoder, behind the encoder's gates, and its ``export.json``.

Contract: ``features`` float32 (cells, cell_dim), any number of cells -> ``embedding``
float32 (1, out_dim). The fp32 file is accepted when every probe bag's embedding keeps
cosine >= ENCODER_MIN_COSINE against torch; int8 (ONNX Runtime dynamic quantisation)
when it keeps INT8_MIN_COSINE against fp32, and otherwise a note says why there is none.
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

from export.onnx_export import (
    OPSET,
    ParityReport,
    embedding_parity,
    gated_export,
    ort_session,
    traced_export,
)
from runtime.parity import ENCODER_MIN_COSINE, INT8_MIN_COSINE, bag_features

if TYPE_CHECKING:
    from collections.abc import Sequence

    from export.patient_encoder import PatientEncoder

FP32_FILE = "patient_encoder.onnx"
INT8_FILE = "patient_encoder.int8.onnx"
PROBE_LENGTHS = (1, 7, 300)
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
        {"cytoedge.model": "patient_encoder", **metadata},
    )


@dataclass
class Int8Outcome:
    accepted: bool
    note: str  # one line for the section's int8_note
    metrics: dict[str, float] = field(default_factory=dict)


def quantize_int8(fp32_path: Path, out_path: Path, cell_dim: int) -> Int8Outcome:
    """Dynamic int8 (QInt8 weights per channel); written only if the gate passes."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    bags = probe_bags(cell_dim, seed=57)
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
        numbers = f"min cosine {report.metrics['min_cosine']:.5f} on bags {PROBE_LENGTHS}"
        if not report.passed:
            return Int8Outcome(
                False, f"int8 rejected: {numbers} (< {INT8_MIN_COSINE})", report.metrics
            )
        shutil.move(str(candidate), out_path)
        return Int8Outcome(True, f"int8 (dynamic) accepted: {numbers}", report.metrics)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_document(
    *,
    kind: str,
    output: str,
    cell_dim: int,
    out_dim: int,
    encoder: dict[str, Any],
    variants: dict[str, str],
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
