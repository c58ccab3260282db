"""``cytoedge train`` on labelled cells: a cell head for the base bundle's encoder, as a
new version (docs/cells.md, "Training a cell head"; METHOD.md C, CytoDINO's recipe).

1. The cells come embedded by the base's own cell path
   (``appliance.validation.labelled_cells``: the crop, normalisation, encoder and
   slide cache of serving), so the head learns on what it will be given.
2. A class with fewer cells than folds, or with all its cells in one group, cannot be
   cross-validated: it is left out of the head with a one-line note, and the taxonomy
   the bundle keeps is restricted to the trained classes, in output order.
3. Folds by group (``export.folds.grouped_folds``): a patient's or an image's cells
   are all on one side of every split, the groups stratified by the classes they hold.
4. One member per fold (``export.cell_head.CellHeadNet``) trained with CytoDINO's loss
   (``export.cell_loss``), early stopping on the loss of an inner split of the
   training groups; its predictions on its own test fold are the out-of-fold ones.
5. One temperature fitted on the out-of-fold probabilities (``export.calibration``),
   applied as serving applies it (the kind's ``calibrate``); the figures and the
   operating point (the confidence at which out-of-fold accuracy reaches the target,
   with its coverage) from ``appliance.validation.cell_measures``.
6. Members exported behind their parity gate, written with the base's other files as
   a new version whose provenance records the counts, the figures and the recipe.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console

from appliance.console import counted, new_progress
from appliance.site.derived_versions import derived_from, write_bundle_version
from appliance.validation.cell_measures import CellFigures, cell_figures
from appliance.validation.labelled_cells import LabelledCells
from export.calibration import fit_temperature
from export.cell_head import CellHeadConfig, CellHeadNet, cell_head_spec, export_cell_head_member
from export.cell_loss import CellLoss, class_weights
from export.folds import grouped_folds
from export.train_heads import torch_threads
from export.train_run import TrainingError
from runtime.bundle_format import Bundle, HeadSpec
from runtime.taxonomy import Taxonomy
from runtime.typed_json import dump, finite

PROVENANCE_KEY = "cell_training"
DEFAULT_NAME = "cells"
MIN_GROUPS_PER_CLASS = 2  # in one group only, the member whose test fold holds it never saw it
MIN_INNER_GROUPS = 4  # fewer training groups: no inner split, every epoch runs


@dataclass(frozen=True)
class CellRecipe:
    """The cell head's training; each value's why is in docs/cells.md."""

    epochs: int = 100
    patience: int = 10
    # What the early stopping keeps: the best balanced accuracy on the inner split, or
    # the lowest loss (docs/cells.md, step 5).
    select_by: Literal["balanced_accuracy", "loss"] = "balanced_accuracy"
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    hidden_dim: int = 256
    dropout: float = 0.2
    gamma: float = 2.0  # focal
    epsilon: float = 0.1  # label mass moved to the true class's lineage siblings
    critical_weight: float = 1.0  # scale of the expected critical penalty
    balance: float = 0.5  # class weights ~ (1 / frequency) ** balance
    threads: int = 1  # a small MLP: one thread waits for no other


@dataclass(frozen=True)
class CellOptions:
    folds: int = 5
    target_accuracy: float = 0.99
    seed: int = 0
    recipe: CellRecipe = field(default_factory=CellRecipe)


@dataclass
class CellTraining:
    bundle: Bundle
    figures: CellFigures  # out of fold, calibrated, over the trained classes
    left_out: dict[str, str]  # class -> why it is not in the head
    epochs: list[int]
    seconds: dict[str, float]


def trainable_classes(cells: LabelledCells, folds: int) -> tuple[list[str], dict[str, str]]:
    """The classes a ``folds``-fold cross-validation can train (taxonomy order), and why
    each other class with cells cannot."""
    kept, left_out = [], {}
    for name, count in cells.class_counts().items():
        groups = len(
            {g for g, label in zip(cells.groups, cells.labels, strict=True) if label == name}
        )
        if count >= folds and groups >= MIN_GROUPS_PER_CLASS:
            kept.append(name)
        else:
            left_out[name] = (
                f"{counted(count, 'cell')} in {counted(groups, 'group')}; {folds}-fold training "
                "needs at least "
                f"{folds} cells in at least {MIN_GROUPS_PER_CLASS} groups"
            )
    return kept, left_out


def train_cell_head(
    cells: LabelledCells,
    base: Bundle,
    console: Console,
    *,
    destination: Path,
    version: str,
    source: str,
    options: CellOptions | None = None,
    intended_use: str | None = None,
) -> CellTraining:
    """Cross-validate, calibrate, export and write the new version (module docstring).
    ``source``: what the cells were read from, for the provenance."""
    options = options or CellOptions()
    k = options.folds
    kept, left_out = trainable_classes(cells, k)
    if len(kept) < 2:
        raise TrainingError(
            f"{source}: a cell head needs two classes, and {len(kept)} can be trained ("
            + "; ".join(f"{name}: {why}" for name, why in left_out.items())
            + ")"
        )
    taxonomy = cells.taxonomy.restricted(kept)
    _check_bags(base, kept)
    rows = np.flatnonzero(np.isin(np.array(cells.labels), kept))
    truth = np.array([kept.index(cells.labels[r]) for r in rows], np.int64)
    groups = [cells.groups[r] for r in rows]
    if len(set(groups)) < k:
        raise TrainingError(
            f"{source}: {len(set(groups))} groups ({cells.grouping}); {k}-fold training "
            f"needs at least {k}"
        )
    started = time.perf_counter()
    features = np.ascontiguousarray(cells.embeddings[rows], np.float32)
    with new_progress(console) as progress:
        task = progress.add_task(f"cell head: {k} folds", total=1.0)
        members, raw, epochs = cross_validate_cells(
            features,
            truth,
            groups,
            taxonomy,
            options,
            progress=lambda fraction: progress.update(task, completed=fraction),
        )
    seconds = {"training": round(time.perf_counter() - started, 1)}
    name = base.cell_head.name if base.cell_head is not None else DEFAULT_NAME
    temperature = fit_temperature(raw, truth)
    # Calibrated as serving calibrates: the kind's own calibration of a section.
    provisional = _spec(name, [], taxonomy, temperature, options, confidence=1.0, coverage=None)
    calibrated = provisional.head_kind.calibrate(provisional, raw)
    labels = [kept[t] for t in truth]
    figures = cell_figures(taxonomy, labels, calibrated, target_accuracy=options.target_accuracy)
    point = figures.operating_point
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".train-cells-", dir=destination.parent) as work:
        files, parity = {}, []
        with console.status(f"Exporting the {k} members of the cell head (parity-gated)..."):
            for index, member in enumerate(members):
                rel = f"heads/{name}.{index}.onnx"
                files[rel] = Path(work) / rel
                report = export_cell_head_member(member, files[rel], taxonomy, index, k)
                parity.append(report.metrics)
        spec = _spec(
            name,
            list(files),
            taxonomy,
            temperature,
            options,
            confidence=point.confidence,
            coverage=point.coverage,
        )
        seconds["export"] = round(time.perf_counter() - started, 1)
        provenance = {
            **{key: v for key, v in base.provenance.items() if key != PROVENANCE_KEY},
            PROVENANCE_KEY: finite(
                _provenance(
                    base, cells, source, figures, left_out, options, epochs, parity, seconds
                )
                | {"classes": list(taxonomy.names), "temperature": temperature}
            ),
        }
        bundle = write_bundle_version(
            base,
            destination,
            version=version,
            heads=list(base.heads),
            head_files=files,
            provenance=provenance,
            intended_use=intended_use,
            cell_head=spec,
        )
    return CellTraining(bundle, figures, left_out, epochs, seconds)


def _check_bags(base: Bundle, kept: Sequence[str]) -> None:
    """The base's case heads must still find the classes their bags read."""
    for head in base.heads:
        missing = sorted(set(head.bag_classes) - set(kept))
        if missing:
            raise TrainingError(
                f"head {head.name} of {base.name} {base.version} reads {', '.join(missing)}, "
                "which the new cell head would not have: label cells of those classes"
            )


def _spec(
    name: str,
    files: list[str],
    taxonomy: Taxonomy,
    temperature: float,
    options: CellOptions,
    *,
    confidence: float,
    coverage: float | None,
) -> HeadSpec:
    return cell_head_spec(
        name,
        files,
        taxonomy,
        temperature=temperature,
        operating_point=confidence,
        target_accuracy=options.target_accuracy,
        coverage=coverage,
    )


def cross_validate_cells(
    features: np.ndarray,
    truth: np.ndarray,
    groups: Sequence[str],
    taxonomy: Taxonomy,
    options: CellOptions,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[CellHeadNet], np.ndarray, list[int]]:
    """(one member per fold, (N, C) out-of-fold probabilities, epochs each member ran)."""
    k, seed, recipe = options.folds, options.seed, options.recipe
    folds = grouped_folds(truth, groups, k, seed)
    group_array = np.asarray(groups, dtype=object)
    members, epochs = [], []
    raw = np.full((len(truth), len(taxonomy.names)), np.nan)
    with torch_threads(recipe.threads):
        for fold in range(k):
            test, rest = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
            train, val = rest, rest[:0]
            inner_groups = len(set(group_array[rest]))
            if inner_groups >= MIN_INNER_GROUPS:
                inner_k = min(max(2, k - 1), inner_groups)
                inner = grouped_folds(truth[rest], group_array[rest], inner_k, seed + 1 + fold)
                train, val = rest[inner != 0], rest[inner == 0]
            member, ran = train_member(
                features[train],
                truth[train],
                features[val],
                truth[val],
                taxonomy,
                recipe,
                seed=seed * 1000 + fold,
            )
            members.append(member)
            epochs.append(ran)
            raw[test] = predict(member, features[test])
            if progress is not None:
                progress((fold + 1) / k)
    return members, raw, epochs


def train_member(
    features: np.ndarray,
    truth: np.ndarray,
    val_features: np.ndarray,
    val_truth: np.ndarray,
    taxonomy: Taxonomy,
    recipe: CellRecipe,
    *,
    seed: int,
) -> tuple[CellHeadNet, int]:
    """One member; (the network in eval mode, epochs run). With validation cells the
    epoch they judge best is kept (``recipe.select_by``: the best balanced accuracy, the
    lower loss breaking ties; or the lowest loss), and training stops ``patience``
    epochs after it."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = len(taxonomy.names)
    config = CellHeadConfig(features.shape[1], classes, recipe.hidden_dim, recipe.dropout)
    net = CellHeadNet(config)
    loss = CellLoss(
        taxonomy,
        gamma=recipe.gamma,
        epsilon=recipe.epsilon,
        critical_weight=recipe.critical_weight,
        weights=class_weights(truth, classes, recipe.balance),
    )
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    x, y = torch.from_numpy(features), torch.from_numpy(truth)
    x_val, y_val = torch.from_numpy(val_features), torch.from_numpy(val_truth)
    best, best_state, stale, ran = (-np.inf, -np.inf), None, 0, 0
    for epoch in range(recipe.epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            optimiser.zero_grad()
            loss(net(x[batch]), y[batch]).backward()
            optimiser.step()
        ran = epoch + 1
        if not len(y_val):
            continue
        net.eval()
        with torch.no_grad():
            logits = net(x_val)
            lower_loss = -float(loss(logits, y_val))
            value = (
                (balanced_accuracy(val_truth, logits.argmax(1).numpy()), lower_loss)
                if recipe.select_by == "balanced_accuracy"
                else (lower_loss, 0.0)
            )
        if value > best:
            best, stale = value, 0
            best_state = {key: v.detach().clone() for key, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= recipe.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval(), ran


def balanced_accuracy(truth: np.ndarray, called: np.ndarray) -> float:
    """The mean recall over the classes present: each class counts once, the rare ones as
    much as the common."""
    return float(np.mean([(called[truth == k] == k).mean() for k in np.unique(truth)]))


def predict(member: CellHeadNet, features: np.ndarray) -> np.ndarray:
    """(N, C) softmax probabilities, as the exported member gives them."""
    with torch.no_grad():
        logits = member.eval()(torch.from_numpy(np.ascontiguousarray(features, np.float32)))
    return torch.softmax(logits, dim=-1).numpy().astype(np.float64)


def _provenance(
    base: Bundle,
    cells: LabelledCells,
    source: str,
    figures: CellFigures,
    left_out: dict[str, str],
    options: CellOptions,
    epochs: list[int],
    parity: list[dict[str, float]],
    seconds: dict[str, float],
) -> dict[str, Any]:
    point = figures.operating_point
    return {
        "derived_from": derived_from(base),
        "labelled_cells": source,
        "layout": cells.layout,
        "groups": len(set(cells.groups)),
        "grouping": cells.grouping,
        "cells_per_class": cells.class_counts(),
        "how": cells.how_counts(),
        "left_out": left_out,
        "taxonomy": cells.taxonomy.name,
        "folds": options.folds,
        "seed": options.seed,
        "recipe": asdict(options.recipe),
        "epochs_run": epochs,
        "out_of_fold": {
            "cells": figures.cells,
            "accuracy": figures.accuracy,
            "weighted_f1": figures.weighted_f1,
            "macro_f1": figures.macro_f1,
            "critical_errors": figures.critical_errors,
            "critical_errors_sure": figures.critical_errors_sure,
            "classes": {c.name: dump(c) for c in figures.classes},
            "confusion": dump(figures.confusion),
        },
        "operating_point": dump(point),
        "target_accuracy": options.target_accuracy,
        "parity": parity,
        "seconds": seconds,
    }
