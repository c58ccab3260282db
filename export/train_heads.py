"""Training one head network on bags of cell embeddings: one loop for every kind.

What a kind learns (its network, targets, loss, early-stopping score, calibration
and thresholds) is its ``Objective`` (export/train_gated.py for METHOD.md A,
export/train_transformer.py for METHOD.md B); the loop is shared:

- embeddings standardised per feature with the training cells' mean and standard
  deviation, folded into the network's first Linear layer at the end, so the
  exported head takes raw embeddings;
- each epoch draws the training bags with replacement in proportion to the
  objective's weights (oversampling of rare positives or classes), at most
  ``max_cells`` random cells of each, ``bags_per_step`` bags padded into one
  batch (``forward_batch``); AdamW, gradient clipping, the learning rate halved
  after ``plateau_epochs`` without progress;
- with validation bags: the best epoch by the objective's score is kept (ties
  to the lower validation loss), and training stops ``patience`` epochs after it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from export.heads import head_kind, output_names
from runtime.bundle_format import INPUT_KINDS, HeadSpec
from runtime.head_kinds import Truth

Targets = dict[str, np.ndarray]  # per kind: named arrays, one row per case
Progress = Callable[[int, int], None]  # (epochs done, epochs at most)


@dataclass(frozen=True)
class TrainingRecipe:
    epochs: int = 60
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    bags_per_step: int = 16
    max_cells: int = 500
    grad_clip: float = 1.0
    plateau_epochs: int = 5
    patience: int = 15
    seed: int = 0
    # A head's matrices are small: on one thread a step waits for no other, on two of a
    # busy CPU OpenMP's synchronisation can cost ten times the arithmetic.
    threads: int = 1


@dataclass
class Criterion:
    """A kind's loss for one training set (class weights, value scaling fitted on it)."""

    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Targets], torch.Tensor]
    finish: Callable[[torch.nn.Module], None] = lambda model: None


class Objective(ABC):
    """What one kind of head learns from a cohort, and how its bundle section is made."""

    kind: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]  # the kinds of slide it learns from (INPUT_KINDS)
    default_name: ClassVar[str]
    # What a case gives it: its bag of cells, or "patient": its patient embedding (1, E)
    reads: ClassVar[str] = "cells"
    # Kinds of the base's heads that predict what it predicts: the new head takes the
    # name and the place of such a head (a probe replaces a MIL head of the same tasks)
    replaces: ClassVar[tuple[str, ...]] = ()
    recipe: TrainingRecipe

    def scores(self, learnt_from: Collection[str]) -> tuple[str, ...]:
        """The trained head's ``inputs``: the kinds of slide it learnt from."""
        return tuple(k for k in INPUT_KINDS if k in learnt_from)

    @abstractmethod
    def provisional_spec(self, name: str) -> HeadSpec:
        """The head's section without files, thresholds or calibration: enough for its
        kind to read a case's labels (``HeadKind.truth``)."""

    @abstractmethod
    def targets(self, truths: Sequence[Truth]) -> Targets:
        """The training targets of each case from its truth (NaN / -1 where unknown)."""

    @abstractmethod
    def usable(self, truth: Truth) -> bool:
        """Whether a case's labels teach this head anything."""

    @abstractmethod
    def strata(self, targets: Targets) -> np.ndarray:
        """(n, L) 1 / 0 / NaN: what the folds keep in proportion."""

    @abstractmethod
    def sample_weights(self, targets: Targets) -> np.ndarray:
        """(n,) how often each training bag is drawn per epoch (oversampling)."""

    @abstractmethod
    def build(self, dim: int) -> torch.nn.Module:
        """A fresh network for ``dim``-d embeddings."""

    @abstractmethod
    def criterion(self, targets: Targets) -> Criterion: ...

    @abstractmethod
    def validation_score(self, raw: np.ndarray, extra: Targets, targets: Targets) -> float:
        """Higher is better (early stopping)."""

    @abstractmethod
    def validation_loss(self, raw: np.ndarray, extra: Targets, targets: Targets) -> float: ...

    @abstractmethod
    def head_spec(
        self,
        name: str,
        files: Sequence[str],
        raw: np.ndarray,
        extra: Targets,
        targets: Targets,
        band: float,
    ) -> HeadSpec:
        """The bundle section: calibration and thresholds fitted on the out-of-fold
        predictions ``raw`` (the members' outputs before calibration)."""

    @abstractmethod
    def describe(self, targets: Targets) -> dict[str, Any]:
        """Counts for the bundle's provenance (cases, positives per task, per class)."""


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for a while (0: leave as it is)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subset(targets: Targets, rows: np.ndarray) -> Targets:
    return {key: value[rows] for key, value in targets.items()}


def pad_bags(bags: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) zero-padded features and the (B, N) mask of real cells."""
    longest = max(len(b) for b in bags)
    features = np.zeros((len(bags), longest, bags[0].shape[1]), np.float32)
    mask = np.zeros((len(bags), longest), bool)
    for row, bag in enumerate(bags):
        features[row, : len(bag)] = bag
        mask[row, : len(bag)] = True
    return torch.from_numpy(features), torch.from_numpy(mask)


def predict_bags(model: torch.nn.Module, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, Targets]:
    """Every bag with all its cells through ``forward`` (what the ONNX file runs), dropout
    off: (probabilities (n, K), {each further output but attention: (n,) or (n, k)})."""
    names = output_names(head_kind(model))
    kept: dict[str, list[np.ndarray]] = {n: [] for n in names if n != "attention"}
    model.eval()
    with torch.no_grad():
        for bag in bags:
            outputs = model(torch.from_numpy(np.ascontiguousarray(bag, np.float32)))
            for name, value in zip(names, outputs, strict=True):
                if name in kept:
                    kept[name].append(value.numpy().astype(np.float64).reshape(-1))
    stacked = {name: np.stack(values) for name, values in kept.items()}
    probabilities = stacked.pop("probabilities")
    return probabilities, {k: v[:, 0] if v.shape[1] == 1 else v for k, v in stacked.items()}


def fold_standardisation(model: torch.nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
    """Make the network take raw embeddings: its first Linear W' = W / std,
    b' = b - W' @ mean."""
    first = model.embed[0]
    with torch.no_grad():
        weight = first.weight / torch.from_numpy(std.astype(np.float32))[None, :]
        first.bias -= weight @ torch.from_numpy(mean.astype(np.float32))
        first.weight.copy_(weight)


def _standardise(bags: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray) -> list:
    return [((b - mean) / std).astype(np.float32) for b in bags]


def train_member(
    objective: Objective,
    bags: Sequence[np.ndarray],
    targets: Targets,
    val_bags: Sequence[np.ndarray],
    val_targets: Targets,
    *,
    seed: int,
    progress: Progress | None = None,
) -> tuple[torch.nn.Module, int]:
    """One network trained on ``bags``; (the network in eval mode taking raw embeddings,
    epochs run)."""
    recipe = objective.recipe
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = objective.build(int(bags[0].shape[1]))
    cells = np.concatenate(list(bags))
    mean, std = cells.mean(0), cells.std(0) + 1e-6
    train_std, val_std = _standardise(bags, mean, std), _standardise(val_bags, mean, std)
    criterion = objective.criterion(targets)
    weights = objective.sample_weights(targets)
    weights = weights / weights.sum()
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="max", factor=0.5, patience=recipe.plateau_epochs
    )
    best: tuple[float, float] = (-np.inf, -np.inf)
    best_state, stale, epochs_run = None, 0, 0
    for epoch in range(recipe.epochs):
        model.train()
        order = rng.choice(len(train_std), size=len(train_std), replace=True, p=weights)
        for start in range(0, len(order), recipe.bags_per_step):
            rows = order[start : start + recipe.bags_per_step]
            batch = []
            for row in rows:
                bag = train_std[row]
                if len(bag) > recipe.max_cells:
                    bag = bag[rng.choice(len(bag), recipe.max_cells, replace=False)]
                batch.append(bag)
            features, mask = pad_bags(batch)
            optimiser.zero_grad()
            loss = criterion.loss(model, features, mask, subset(targets, rows))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimiser.step()
        epochs_run = epoch + 1
        if progress is not None:
            progress(epochs_run, recipe.epochs)
        if not val_std:
            continue
        raw, extra = predict_bags(model, val_std)
        score = objective.validation_score(raw, extra, val_targets)
        score = 0.0 if np.isnan(score) else score  # undefined (one class): the loss decides
        loss = objective.validation_loss(raw, extra, val_targets)
        scheduler.step(score)
        if score > best[0] + 1e-4 or (abs(score - best[0]) <= 1e-4 and -loss > best[1]):
            best, stale = (score, -loss), 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= recipe.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    fold_standardisation(model, mean, std)
    criterion.finish(model)
    return model.eval(), epochs_run
