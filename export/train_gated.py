"""What the myeloma head learns (METHOD.md A): gated-attention MIL, one sigmoid per marker.

Kept from the paper's recipe: AdamW (weight decay 1e-4), at most 500 random cells
per bag per epoch and all cells at evaluation, oversampling of rare positives,
focal loss with gamma 2 and class weights ~ 1/sqrt(prevalence), missing labels
masked out, grad-clip 1.0, LR halved on a 5-epoch plateau, early stop on the
validation mean AUC, thresholds by Youden's index. Departures, so that a few
hundred cases train in minutes on a CPU: a higher learning rate (1e-3 instead of
2e-4), at most 60 epochs, a narrower network (256 / 128 instead of 512 / 256).
Calibration: Platt scaling per task on the out-of-fold predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from appliance.validation import metrics
from export.calibration import fit_platt
from export.documents import HIGH_RISK_TASKS
from export.heads import build_head
from export.train_heads import Criterion, Objective, Targets, TrainingRecipe
from runtime.bundle_format import HeadSpec
from runtime.head_kinds import Truth
from runtime.labels import MYELOMA_MARKERS

THRESHOLD_LIMITS = (1e-3, 1 - 1e-3)


@dataclass(frozen=True)
class GatedRecipe(TrainingRecipe):
    focal_gamma: float = 2.0
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.2


def focal_loss(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    weights_pos: torch.Tensor,
    weights_neg: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Per-task focal loss on sigmoid outputs; NaN targets are masked out."""
    known = ~torch.isnan(targets)
    y = torch.nan_to_num(targets, nan=0.0)
    p = probabilities.clamp(1e-6, 1 - 1e-6)
    p_true = torch.where(y > 0.5, p, 1 - p)
    weight = torch.where(y > 0.5, weights_pos, weights_neg)
    loss = -weight * (1 - p_true) ** gamma * torch.log(p_true)
    return (loss * known).sum() / known.sum().clamp(min=1)


def _prevalence(labels: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.clip(np.nan_to_num(np.nanmean(labels, axis=0), nan=0.5), 0.05, 0.95)


class GatedObjective(Objective):
    kind = "gated_attention_mil"
    inputs = ("scans", "fields")  # smears scanned, or marrow photographed
    default_name = "myeloma"
    replaces = ("gated_attention_mil", "patient_probe")

    def __init__(
        self, recipe: GatedRecipe | None = None, tasks: Sequence[str] = MYELOMA_MARKERS
    ) -> None:
        self.recipe = recipe or GatedRecipe()
        self.tasks = tuple(tasks)

    def provisional_spec(self, name: str) -> HeadSpec:
        return HeadSpec(
            name=name,
            kind=self.kind,
            files=("-",),
            thresholds=dict.fromkeys(self.tasks, 0.5),
            inputs=self.inputs,
            extra={"tasks": list(self.tasks)},
        )

    def usable(self, truth: Truth) -> bool:
        return any(task in truth.tasks for task in self.tasks)

    def targets(self, truths: Sequence[Truth]) -> Targets:
        rows = [
            [float(t.tasks[task]) if task in t.tasks else np.nan for task in self.tasks]
            for t in truths
        ]
        return {"tasks": np.array(rows, np.float64).reshape(-1, len(self.tasks))}

    def strata(self, targets: Targets) -> np.ndarray:
        return targets["tasks"]

    def sample_weights(self, targets: Targets) -> np.ndarray:
        """A bag positive for a rare task is drawn sqrt(negatives / positives) times as
        often (the most for its rarest task), so rare positives are seen each epoch."""
        labels = targets["tasks"]
        prevalence = _prevalence(labels)
        boost = np.sqrt((1 - prevalence) / prevalence)
        positive = np.nan_to_num(labels, nan=0.0) > 0.5
        return np.maximum(1.0, np.where(positive, boost, 1.0).max(axis=1))

    def build(self, dim: int) -> torch.nn.Module:
        r = self.recipe
        return build_head(
            self.kind,
            {
                "in_dim": dim,
                "hidden_dim": r.hidden_dim,
                "attention_dim": r.attention_dim,
                "dropout": r.dropout,
                "tasks": list(self.tasks),
            },
        )

    def criterion(self, targets: Targets) -> Criterion:
        prevalence = _prevalence(targets["tasks"])
        w_pos = torch.tensor(1 / np.sqrt(prevalence), dtype=torch.float32)
        w_neg = torch.tensor(1 / np.sqrt(1 - prevalence), dtype=torch.float32)
        scale = (w_pos + w_neg) / 2
        w_pos, w_neg = w_pos / scale, w_neg / scale
        gamma = self.recipe.focal_gamma

        def loss(
            model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor, batch: Targets
        ) -> torch.Tensor:
            probabilities = model.forward_batch(features, mask)
            y = torch.from_numpy(batch["tasks"].astype(np.float32))
            return focal_loss(probabilities, y, w_pos, w_neg, gamma)

        return Criterion(loss)

    def validation_score(self, raw: np.ndarray, extra: Targets, targets: Targets) -> float:
        aucs = [metrics.auc(raw[:, t], targets["tasks"][:, t]) for t in range(len(self.tasks))]
        return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")

    def validation_loss(self, raw: np.ndarray, extra: Targets, targets: Targets) -> float:
        p = np.clip(raw, 1e-6, 1 - 1e-6)
        y = targets["tasks"]
        known = ~np.isnan(y)
        losses = -(np.nan_to_num(y) * np.log(p) + (1 - np.nan_to_num(y)) * np.log1p(-p))
        return float(losses[known].mean()) if known.any() else 0.0

    def head_spec(
        self,
        name: str,
        files: Sequence[str],
        raw: np.ndarray,
        extra: Targets,
        targets: Targets,
        band: float,
    ) -> HeadSpec:
        labels = targets["tasks"]
        platt = {task: fit_platt(raw[:, t], labels[:, t]) for t, task in enumerate(self.tasks)}
        calibration = {
            "kind": "platt",
            "a": {task: ab[0] for task, ab in platt.items()},
            "b": {task: ab[1] for task, ab in platt.items()},
        }
        spec = HeadSpec(
            name=name,
            kind=self.kind,
            files=tuple(files),
            thresholds=dict.fromkeys(self.tasks, 0.5),
            indeterminate_band=band,
            calibration=calibration,
            inputs=self.inputs,
            extra={
                "tasks": list(self.tasks),
                "high_risk": [t for t in HIGH_RISK_TASKS if t in self.tasks],
            },
        )
        calibrated = np.stack([spec.head_kind.calibrate(spec, row) for row in raw])
        thresholds = {
            task: float(
                np.clip(metrics.youden_threshold(calibrated[:, t], labels[:, t]), *THRESHOLD_LIMITS)
            )
            for t, task in enumerate(self.tasks)
        }
        return HeadSpec(**{**spec.__dict__, "thresholds": thresholds})

    def describe(self, targets: Targets) -> dict[str, Any]:
        labels = targets["tasks"]
        return {
            "cases": len(labels),
            "positives": {
                task: int(np.nansum(labels[:, t] > 0.5)) for t, task in enumerate(self.tasks)
            },
            "labelled": {
                task: int((~np.isnan(labels[:, t])).sum()) for t, task in enumerate(self.tasks)
            },
        }
