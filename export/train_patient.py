"""What a probe on the patient embedding learns: the myeloma markers from one vector per
case (GenBloom's evaluation recipe; runtime/head_kinds/patient_probe.py).

Targets, class weighting, oversampling, calibration (Platt per task) and thresholds
(Youden) are the gated-attention head's (export/train_gated.py), so the two recipes are
compared on equal terms; only the network differs: a linear layer per task on the
standardised embedding (``hidden_dim`` 0, logistic regression with weight decay as the
L2 penalty), or one hidden GELU layer (``patient-mlp``). Each case is a bag of one row,
its unit-length patient embedding as ``runtime.patient`` gives it at scoring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from export.heads import build_head
from export.train_gated import GatedObjective
from export.train_heads import Targets, TrainingRecipe
from runtime.bundle_format import HeadSpec
from runtime.labels import MYELOMA_MARKERS


@dataclass(frozen=True)
class PatientProbeRecipe(TrainingRecipe):
    # Few weights, one row per case: more epochs and a stronger penalty than a MIL head.
    epochs: int = 200
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    plateau_epochs: int = 10
    patience: int = 30
    focal_gamma: float = 0.0  # plain weighted cross-entropy, as a logistic regression
    hidden_dim: int = 0  # 0: linear probe; > 0: one hidden layer of this width
    dropout: float = 0.1


class PatientProbeObjective(GatedObjective):
    """The gated head's objective on a different network, tied to one patient encoder."""

    kind = "patient_probe"
    reads = "patient"

    def __init__(
        self,
        patient_encoder_sha256: str,
        recipe: PatientProbeRecipe | None = None,
        tasks: Sequence[str] = MYELOMA_MARKERS,
    ) -> None:
        super().__init__(None, tasks)
        self.recipe = recipe or PatientProbeRecipe()  # type: ignore[assignment]
        self.patient_encoder_sha256 = patient_encoder_sha256

    def _tied(self, spec: HeadSpec) -> HeadSpec:
        extra = {**spec.extra, "patient_encoder_sha256": self.patient_encoder_sha256}
        return dataclasses.replace(spec, extra=extra)

    def provisional_spec(self, name: str) -> HeadSpec:
        return self._tied(super().provisional_spec(name))

    def head_spec(
        self,
        name: str,
        files: Sequence[str],
        raw: np.ndarray,
        extra: Targets,
        targets: Targets,
        band: float,
    ) -> HeadSpec:
        return self._tied(super().head_spec(name, files, raw, extra, targets, band))

    def build(self, dim: int) -> torch.nn.Module:
        r = self.recipe
        assert isinstance(r, PatientProbeRecipe)
        return build_head(
            self.kind,
            {
                "in_dim": dim,
                "hidden_dim": r.hidden_dim,
                "dropout": r.dropout,
                "tasks": list(self.tasks),
            },
        )
