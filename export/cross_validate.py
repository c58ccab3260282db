"""Patient-level k-fold cross-validation of one head: the fold models become the
shipped ensemble, and each case's prediction by the model that never saw it (its
out-of-fold prediction) is what calibration, thresholds and the training report
are made from.

Fold f is the test fold of member f; the member learns on the other folds less an
inner, stratified validation share (one in k - 1 of them) that decides its early
stop, so no case is both tuned on and tested on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from export.folds import stratified_folds
from export.train_heads import (
    Objective,
    Targets,
    predict_bags,
    subset,
    torch_threads,
    train_member,
)

MIN_INNER_VALIDATION = 8  # fewer training cases than this: no inner split, all epochs run


@dataclass
class CrossValidation:
    members: list[torch.nn.Module]
    raw: np.ndarray  # (n, K) out-of-fold probabilities, before calibration
    extra: Targets  # out-of-fold further outputs (hemoglobin)
    folds: np.ndarray  # (n,) the test fold of each case
    epochs: list[int]
    seconds: float


def cross_validate(
    objective: Objective,
    bags: Sequence[np.ndarray],
    targets: Targets,
    *,
    k: int,
    seed: int,
    progress: Callable[[float], None] | None = None,
) -> CrossValidation:
    with torch_threads(objective.recipe.threads):
        return _cross_validate(objective, bags, targets, k, seed, progress)


def _cross_validate(
    objective: Objective,
    bags: Sequence[np.ndarray],
    targets: Targets,
    k: int,
    seed: int,
    progress: Callable[[float], None] | None,
) -> CrossValidation:
    started = time.perf_counter()
    strata = objective.strata(targets)
    folds = stratified_folds(strata, k, seed)
    members: list[torch.nn.Module] = []
    epochs: list[int] = []
    raw: np.ndarray | None = None
    extra: Targets = {}
    for fold in range(k):
        test = np.flatnonzero(folds == fold)
        rest = np.flatnonzero(folds != fold)
        if len(rest) >= MIN_INNER_VALIDATION:
            inner = stratified_folds(strata[rest], max(2, k - 1), seed + 1 + fold)
            val, train = rest[inner == 0], rest[inner != 0]
        else:
            val, train = rest[:0], rest

        def report(done: int, total: int, fold: int = fold) -> None:
            if progress is not None:
                progress((fold + done / total) / k)

        member, ran = train_member(
            objective,
            [bags[i] for i in train],
            subset(targets, train),
            [bags[i] for i in val],
            subset(targets, val),
            seed=seed * 1000 + fold,
            progress=report,
        )
        members.append(member)
        epochs.append(ran)
        fold_raw, fold_extra = predict_bags(member, [bags[i] for i in test])
        if raw is None:
            raw = np.full((len(bags), fold_raw.shape[1]), np.nan)
            extra = {k_: np.full((len(bags), *v.shape[1:]), np.nan) for k_, v in fold_extra.items()}
        raw[test] = fold_raw
        for name, values in fold_extra.items():
            extra[name][test] = values
        if progress is not None:
            progress((fold + 1) / k)
    assert raw is not None
    return CrossValidation(members, raw, extra, folds, epochs, time.perf_counter() - started)
