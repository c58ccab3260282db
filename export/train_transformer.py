"""What the peripheral-blood head learns (METHOD.md B): the transformer aggregator over a
patient's single cells, the 8-class softmax and the hemoglobin regression.

As cAItomorph: a k-fold ensemble whose members' probabilities are averaged, a
malignancy probability as the sum of the malignant classes, temperature
calibration. Loss: cross-entropy with class weights ~ 1/sqrt(prevalence) plus the
squared error of the standardised hemoglobin (cases without one masked out),
rare classes oversampled. Departures, so that a few hundred patients train in
minutes on a CPU (the paper's 10 x 512 network takes hours there; set the recipe's
sizes to train it on a GPU): 2 pre-norm layers of width 128 (4 heads x 32, MLP
256, classifier 128 -> 64 -> C), at most 256 cells per bag per training step, early
stop on the validation loss. The malignancy threshold is Youden's on the
calibrated out-of-fold malignancy probability.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from appliance.validation import metrics
from export.calibration import fit_temperature
from export.documents import BENIGN_CLASSES
from export.folds import one_hot
from export.heads import build_head
from export.train_heads import Criterion, Objective, Targets, TrainingRecipe
from runtime.bundle_format import HeadSpec
from runtime.head_kinds import Truth
from runtime.head_kinds.transformer_mil import MALIGNANCY
from runtime.labels import PB_CLASSES

THRESHOLD_LIMITS = (1e-3, 1 - 1e-3)


@dataclass(frozen=True)
class TransformerRecipe(TrainingRecipe):
    epochs: int = 80
    learning_rate: float = 5e-4
    bags_per_step: int = 8
    max_cells: int = 256
    patience: int = 20
    depth: int = 2
    width: int = 128
    num_heads: int = 4
    mlp_dim: int = 256
    classifier_hidden: int = 64
    dropout: float = 0.1
    hemoglobin_weight: float = 0.3


class TransformerObjective(Objective):
    kind = "transformer_mil"
    inputs = ("cells", "fields")
    default_name = "peripheral-blood"
    replaces = ("transformer_mil",)

    def __init__(
        self, recipe: TransformerRecipe | None = None, classes: Sequence[str] = PB_CLASSES
    ) -> None:
        self.recipe = recipe or TransformerRecipe()
        self.classes = tuple(classes)
        self.malignant = tuple(c for c in self.classes if c not in BENIGN_CLASSES)

    def scores(self, learnt_from: Collection[str]) -> tuple[str, ...]:
        """Also the white cells found on blood field photos: a site without a cell-image
        analyser photographs fields (verify such a bundle on field cases with validate)."""
        return super().scores({*learnt_from, "fields"} if "cells" in learnt_from else learnt_from)

    def _extra(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "malignant_classes": list(self.malignant)}

    def provisional_spec(self, name: str) -> HeadSpec:
        return HeadSpec(
            name=name,
            kind=self.kind,
            files=("-",),
            thresholds={MALIGNANCY: 0.5},
            inputs=self.inputs,
            extra=self._extra(),
        )

    def usable(self, truth: Truth) -> bool:
        return truth.label is not None

    def targets(self, truths: Sequence[Truth]) -> Targets:
        classes = [self.classes.index(t.label) if t.label is not None else -1 for t in truths]
        hemoglobin = [t.values.get("hemoglobin", np.nan) for t in truths]
        return {
            "classes": np.array(classes, np.int64),
            "hemoglobin": np.array(hemoglobin, np.float64),
        }

    def strata(self, targets: Targets) -> np.ndarray:
        return one_hot(targets["classes"], len(self.classes))

    def _counts(self, targets: Targets) -> np.ndarray:
        known = targets["classes"][targets["classes"] >= 0]
        return np.bincount(known, minlength=len(self.classes)).astype(np.float64)

    def sample_weights(self, targets: Targets) -> np.ndarray:
        """A case of a rare class is drawn sqrt(largest class / its class) times as often."""
        counts = self._counts(targets)
        boost = np.sqrt(counts.max() / np.maximum(counts, 1))
        return boost[np.maximum(targets["classes"], 0)]

    def build(self, dim: int) -> torch.nn.Module:
        r = self.recipe
        return build_head(
            self.kind,
            {
                "in_dim": dim,
                "width": r.width,
                "depth": r.depth,
                "num_heads": r.num_heads,
                "mlp_dim": r.mlp_dim,
                "dropout": r.dropout,
                "classifier_hidden": r.classifier_hidden,
                "classes": list(self.classes),
            },
        )

    def criterion(self, targets: Targets) -> Criterion:
        counts = self._counts(targets)
        prevalence = np.clip(counts / max(counts.sum(), 1), 0.02, 1.0)
        weights = 1 / np.sqrt(prevalence)
        weights = torch.tensor(weights / weights.mean(), dtype=torch.float32)
        values = targets["hemoglobin"][~np.isnan(targets["hemoglobin"])]
        centre = float(values.mean()) if len(values) else 0.0
        spread = float(values.std()) + 1e-6 if len(values) > 1 else 1.0
        share = self.recipe.hemoglobin_weight

        def loss(
            model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor, batch: Targets
        ) -> torch.Tensor:
            probabilities, hemoglobin = model.forward_batch(features, mask)
            classes = torch.from_numpy(batch["classes"])
            log_p = torch.log(probabilities.clamp_min(1e-7))
            total = torch.nn.functional.nll_loss(log_p, classes, weight=weights)
            truth = torch.from_numpy(((batch["hemoglobin"] - centre) / spread).astype(np.float32))
            known = ~torch.isnan(truth)
            if known.any():
                error = (hemoglobin[:, 0] - torch.nan_to_num(truth)) ** 2
                total = total + share * (error * known).sum() / known.sum()
            return total

        def finish(model: torch.nn.Module) -> None:
            """The network learnt the standardised value: give it g/dL."""
            layer = model.hemoglobin
            with torch.no_grad():
                layer.weight.mul_(spread)
                layer.bias.mul_(spread).add_(centre)

        return Criterion(loss, finish)

    def validation_loss(self, raw: np.ndarray, extra: Targets, targets: Targets) -> float:
        classes = targets["classes"]
        known = classes >= 0
        if not known.any():
            return 0.0
        return float(-np.log(np.clip(raw[known, classes[known]], 1e-7, 1)).mean())

    def validation_score(self, raw: np.ndarray, extra: Targets, targets: Targets) -> float:
        return -self.validation_loss(raw, extra, targets)

    def head_spec(
        self,
        name: str,
        files: Sequence[str],
        raw: np.ndarray,
        extra: Targets,
        targets: Targets,
        band: float,
    ) -> HeadSpec:
        temperature = fit_temperature(raw, targets["classes"])
        spec = HeadSpec(
            name=name,
            kind=self.kind,
            files=tuple(files),
            thresholds={MALIGNANCY: 0.5},
            indeterminate_band=band,
            calibration={"kind": "temperature", "temperature": temperature},
            inputs=self.inputs,
            extra=self._extra(),
        )
        calibrated = np.stack([spec.head_kind.calibrate(spec, row) for row in raw])
        malignant = [self.classes.index(c) for c in self.malignant]
        classes = targets["classes"]
        truth = np.where(classes >= 0, np.isin(classes, malignant), np.nan)
        threshold = metrics.youden_threshold(calibrated[:, malignant].sum(axis=1), truth)
        return HeadSpec(
            **{
                **spec.__dict__,
                "thresholds": {MALIGNANCY: float(np.clip(threshold, *THRESHOLD_LIMITS))},
            }
        )

    def describe(self, targets: Targets) -> dict[str, Any]:
        counts = self._counts(targets)
        return {
            "cases": int(counts.sum()),
            "classes": {c: int(n) for c, n in zip(self.classes, counts, strict=True)},
            "malignant": int(sum(counts[self.classes.index(c)] for c in self.malignant)),
            "with_hemoglobin": int((~np.isnan(targets["hemoglobin"])).sum()),
        }
