"""CytoDINO's loss for a cell head (METHOD.md C), read from the bundle's taxonomy.

- **Focal loss** (Lin et al. 2017, gamma 2): a cell the head already calls right with
  confidence weighs little, so the rare and hard classes drive the training.
- **Label smoothing toward lineage siblings**: the true class keeps 1 - epsilon of the
  target and its siblings (the classes with the same whole lineage path, e.g. the size
  anomalies of red cells) share epsilon; a class without siblings keeps a plain one-hot
  target. Calling a sibling is then a lesser error than calling across lineages.
- **Penalty of critical confusions**: the expected penalty sum_c penalty(true, c) p_c
  of the taxonomy's critical confusions (a blast called a lymphocyte), added per cell,
  so that a dangerous error costs more than an equally probable harmless one.
- **Class weights** ~ (1 / frequency) ** ``balance`` (0.5: inverse square root, as the
  case heads weigh rare markers), normalised to a mean of 1 over the training cells.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from runtime.taxonomy import Taxonomy


def sibling_targets(taxonomy: Taxonomy, epsilon: float) -> np.ndarray:
    """(C, C): row t is the target of a cell of class t (module docstring)."""
    names = taxonomy.names
    targets = np.eye(len(names))
    for index, name in enumerate(names):
        siblings = [names.index(s) for s in taxonomy.siblings(name)]
        if siblings and epsilon > 0:
            targets[index, index] = 1.0 - epsilon
            targets[index, siblings] = epsilon / len(siblings)
    return targets


def critical_penalties(taxonomy: Taxonomy) -> np.ndarray:
    """(C, C): the penalty of calling a cell of class t (row) class c (column); 0 for a
    confusion the taxonomy does not name critical (the larger one where two name it)."""
    names = taxonomy.names
    penalties = np.zeros((len(names), len(names)))
    for confusion in taxonomy.critical:
        for predicted in confusion.predicted:
            at = names.index(confusion.true), names.index(predicted)
            penalties[at] = max(penalties[at], confusion.penalty)
    return penalties


def class_weights(truth: np.ndarray, classes: int, balance: float) -> np.ndarray:
    """(C,) weight per class, ~ (1 / frequency) ** balance, mean 1 over the cells; 0 for a
    class without cells."""
    counts = np.bincount(truth, minlength=classes).astype(np.float64)
    weights = np.where(counts > 0, (len(truth) / np.maximum(counts, 1)) ** balance, 0.0)
    return weights / (weights[truth].mean() if len(truth) else 1.0)


class CellLoss(nn.Module):
    """The mean over cells of weight(true) * (focal loss on the smoothed target + the
    expected critical penalty), from (N, C) logits and (N,) true class indices."""

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        gamma: float = 2.0,
        epsilon: float = 0.1,
        critical_weight: float = 1.0,
        weights: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        classes = len(taxonomy.names)
        self.gamma = gamma
        self.critical_weight = critical_weight
        self.register_buffer("targets", _tensor(sibling_targets(taxonomy, epsilon)))
        self.register_buffer("penalties", _tensor(critical_penalties(taxonomy)))
        self.register_buffer("weights", _tensor(np.ones(classes) if weights is None else weights))

    def per_cell(self, logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """(N,) each cell's loss before its class weight."""
        log_p = torch.log_softmax(logits, dim=-1)
        p = log_p.exp()
        focal = -(self.targets[truth] * (1 - p) ** self.gamma * log_p).sum(-1)
        return focal + self.critical_weight * (self.penalties[truth] * p).sum(-1)

    def forward(self, logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        weights = self.weights[truth]
        return (weights * self.per_cell(logits, truth)).sum() / weights.sum().clamp_min(1e-12)


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, np.float32))
