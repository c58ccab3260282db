"""Training the gated-attention MIL head on bags of cell embeddings (METHOD.md A).

Kept from the paper's recipe: AdamW (weight decay 1e-4), bags of up to 500
random cells per bag per epoch and all cells at evaluation, focal loss with
gamma 2 and class weights ~ 1/sqrt(prevalence), missing labels masked out,
grad-clip 1.0, LR halved on a 5-epoch plateau, early stop on the validation
mean AUC, thresholds by Youden's index on the validation split.
Departures, for a few-minute CPU demo on a few dozen synthetic slides: a
higher learning rate (1e-3 instead of 2e-4), fewer epochs, and no
oversampling (the synthetic labels are drawn balanced).

Embeddings are standardised per feature with the training cells' mean and
standard deviation, folded into the head's first Linear layer so the exported
head still takes raw embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from export.heads import GatedAttentionMIL, build_head


@dataclass(frozen=True)
class HeadRecipe:
    epochs: int = 40
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    bags_per_step: int = 16
    max_cells: int = 500
    focal_gamma: float = 2.0
    grad_clip: float = 1.0
    plateau_epochs: int = 5
    patience: int = 15
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.2
    seed: int = 0


@dataclass
class TrainedHead:
    model: GatedAttentionMIL
    thresholds: dict[str, float]
    validation_auc: dict[str, float]
    epochs_run: int


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN for one class."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    keep = ~np.isnan(labels.astype(float))
    scores, labels = scores[keep], labels[keep].astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (midpoint between scores)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, float)
    keep = ~np.isnan(labels)
    scores, labels = scores[keep], labels[keep].astype(bool)
    if labels.all() or (~labels).all():
        return 0.5
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2])
    best, best_j = 0.5, -np.inf
    for threshold in candidates:
        predicted = scores >= threshold
        j = predicted[labels].mean() - predicted[~labels].mean()
        if j > best_j:
            best, best_j = float(threshold), j
    return float(np.clip(best, 0.0, 1.0))


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


def predict_bags(model: torch.nn.Module, bags: Sequence[np.ndarray]) -> np.ndarray:
    """(B, T) probabilities with all cells of each bag, dropout off."""
    model.eval()
    with torch.no_grad():
        return np.stack([model(torch.from_numpy(bag))[0].numpy() for bag in bags])


def train_gated_mil(
    train_bags: Sequence[np.ndarray],
    train_labels: np.ndarray,
    val_bags: Sequence[np.ndarray],
    val_labels: np.ndarray,
    tasks: Sequence[str],
    recipe: HeadRecipe | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainedHead:
    """Train one multi-task head; returns the best epoch's model by validation mean AUC."""
    recipe = recipe or HeadRecipe()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    dim = int(train_bags[0].shape[1])
    model = build_head(
        "gated_attention_mil",
        {
            "in_dim": dim,
            "hidden_dim": recipe.hidden_dim,
            "attention_dim": recipe.attention_dim,
            "dropout": recipe.dropout,
            "tasks": list(tasks),
        },
    )
    assert isinstance(model, GatedAttentionMIL)
    cells = np.concatenate(list(train_bags))
    mean, std = cells.mean(0), cells.std(0) + 1e-6
    standardise = [((b - mean) / std).astype(np.float32) for b in train_bags]
    val_std = [((b - mean) / std).astype(np.float32) for b in val_bags]

    labels = np.asarray(train_labels, np.float32)
    prevalence = np.clip(np.nanmean(labels, axis=0), 0.05, 0.95)
    w_pos = torch.tensor(1 / np.sqrt(prevalence), dtype=torch.float32)
    w_neg = torch.tensor(1 / np.sqrt(1 - prevalence), dtype=torch.float32)
    scale = (w_pos + w_neg) / 2
    w_pos, w_neg = w_pos / scale, w_neg / scale

    optimiser = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="max", factor=0.5, patience=recipe.plateau_epochs
    )
    best_auc, best_state, stale, epochs_run = -np.inf, None, 0, 0
    for epoch in range(recipe.epochs):
        model.train()
        order = rng.permutation(len(standardise))
        for start in range(0, len(order), recipe.bags_per_step):
            optimiser.zero_grad()
            batch = order[start : start + recipe.bags_per_step]
            loss = torch.zeros(())
            for index in batch:
                bag = standardise[index]
                if len(bag) > recipe.max_cells:
                    bag = bag[rng.choice(len(bag), recipe.max_cells, replace=False)]
                probabilities, _ = model(torch.from_numpy(bag))
                loss = loss + focal_loss(
                    probabilities, torch.from_numpy(labels[index]), w_pos, w_neg, recipe.focal_gamma
                )
            (loss / len(batch)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimiser.step()
        epochs_run = epoch + 1
        val_pred = predict_bags(model, val_std)
        mean_auc = float(
            np.nanmean([auc(val_pred[:, t], val_labels[:, t]) for t in range(len(tasks))])
        )
        scheduler.step(mean_auc)
        if progress is not None:
            progress(epochs_run, recipe.epochs)
        if mean_auc > best_auc + 1e-4:
            best_auc, stale = mean_auc, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= recipe.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    fold_standardisation(model, mean, std)
    model.eval()
    val_pred = predict_bags(model, val_bags)
    thresholds = {
        task: youden_threshold(val_pred[:, t], val_labels[:, t]) for t, task in enumerate(tasks)
    }
    val_auc = {task: auc(val_pred[:, t], val_labels[:, t]) for t, task in enumerate(tasks)}
    return TrainedHead(model, thresholds, val_auc, epochs_run)


def fold_standardisation(model: GatedAttentionMIL, mean: np.ndarray, std: np.ndarray) -> None:
    """Make the head take raw embeddings: W' = W / std, b' = b - W' @ mean."""
    first = model.embed[0]
    with torch.no_grad():
        weight = first.weight / torch.from_numpy(std.astype(np.float32))[None, :]
        first.bias -= weight @ torch.from_numpy(mean.astype(np.float32))
        first.weight.copy_(weight)
