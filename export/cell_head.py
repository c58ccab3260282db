"""The cell head's network and its ONNX export (docs/cells.md).

A small MLP on the encoder's embedding of one cell: LayerNorm, Linear D -> hidden,
GELU, dropout, Linear hidden -> C, softmax. One file per ensemble member (a member
per cross-validation fold), input ``features`` float32 (N, D), output
``probabilities`` float32 (N, C), with a dynamic ``cells`` axis. Each member is
exported behind a parity gate: its probabilities within
``runtime.parity.HEAD_MAX_PROBABILITY_DIFF`` of torch's on embedding-like rows, and
the same class for every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import OPSET, ParityReport, gated_export, ort_session, traced_export
from runtime.bundle_format import INPUT_KINDS, HeadInput, HeadSpec
from runtime.head_kinds.cell_classifier import CONFIDENCE
from runtime.parity import HEAD_MAX_PROBABILITY_DIFF, bag_features
from runtime.taxonomy import Taxonomy
from runtime.typed_json import dump

KIND = "cell_classifier"
PROBE_ROWS = (1, 7, 513)


@dataclass(frozen=True)
class CellHeadConfig:
    in_dim: int
    classes: int
    hidden_dim: int = 256
    dropout: float = 0.2


class CellHeadNet(nn.Module):
    """(N, D) embeddings -> (N, C) logits; ``Probabilities`` wraps it for export."""

    def __init__(self, config: CellHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.Sequential(
            nn.LayerNorm(config.in_dim),
            nn.Linear(config.in_dim, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Probabilities(nn.Module):
    """A member as exported: softmax over its logits."""

    def __init__(self, net: CellHeadNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(features), dim=-1)


def cell_head_parity(member: CellHeadNet, onnx_path: Path) -> ParityReport:
    """ONNX Runtime vs torch on embedding-like rows of several lengths."""
    session = ort_session(onnx_path)
    model = Probabilities(member).eval()
    worst, changed = 0.0, 0
    for length in PROBE_ROWS:
        rows = bag_features(length, member.config.in_dim, seed=length)
        with torch.no_grad():
            expected = model(torch.from_numpy(rows)).numpy()
        got = session.run(["probabilities"], {"features": rows})[0]  # type: ignore[attr-defined]
        worst = max(worst, float(np.abs(expected - got).max()))
        changed += int((expected.argmax(1) != got.argmax(1)).sum())
    return ParityReport(
        what=onnx_path.name,
        passed=worst <= HEAD_MAX_PROBABILITY_DIFF and changed == 0,
        metrics={"max_probability_diff": worst, "changed_classes": float(changed)},
        limits={
            "max_probability_diff": f"<= {HEAD_MAX_PROBABILITY_DIFF}",
            "changed_classes": "== 0",
        },
    )


def export_cell_head_member(
    member: CellHeadNet, out_path: Path, taxonomy: Taxonomy, index: int, count: int
) -> ParityReport:
    """One ensemble member to ONNX behind its gate (nothing is written when it fails)."""
    member = member.eval()
    example = torch.from_numpy(bag_features(7, member.config.in_dim, seed=7))

    def write(path: Path) -> None:
        traced_export(
            Probabilities(member).eval(),
            (example,),
            str(path),
            input_names=["features"],
            output_names=["probabilities"],
            dynamic_axes={"features": {0: "cells"}, "probabilities": {0: "cells"}},
            opset_version=OPSET,
            dynamo=False,
        )

    info = {
        "cytoedge.model": "cell_head",
        "cytoedge.head_kind": KIND,
        "cytoedge.taxonomy": taxonomy.name,
        "cytoedge.ensemble_member": f"{index + 1}/{count}",
    }
    return gated_export(write, lambda path: cell_head_parity(member, path), out_path, info)


def cell_head_spec(
    name: str,
    files: list[str],
    taxonomy: Taxonomy,
    *,
    temperature: float,
    operating_point: float,
    target_accuracy: float,
    coverage: float | None,
    inputs: tuple[HeadInput, ...] = INPUT_KINDS,
) -> HeadSpec:
    """The bundle's ``cell_head`` section for a trained ensemble."""
    return HeadSpec(
        name=name,
        kind=KIND,
        files=tuple(files),
        labels={c.name: c.label for c in taxonomy.classes},
        thresholds={CONFIDENCE: float(operating_point)},
        calibration={"kind": "temperature", "temperature": float(temperature)},
        inputs=inputs,
        extra={
            "taxonomy": dump(taxonomy),
            "target_accuracy": float(target_accuracy),
            "coverage": None if coverage is None else float(coverage),
        },
    )
