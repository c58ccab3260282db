"""Patient-level stratified k-fold assignment (numpy only).

Iterative stratification (Sechidis, Tsoumakas and Vlahavas 2011): labels are
dealt from the rarest first, each case of that label to the fold that still
needs most of it, so that every fold holds its share of each label's positives,
multi-label (myeloma markers) and single-label (a class, one-hot) alike. A case
is one patient, so none of its scans is ever on both sides of a split. Labelled
cells are dealt a group (a patient, an image) at a time: ``grouped_folds``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each case; ``labels`` (n, L) 1 / 0 / NaN (NaN: unknown)."""
    positives = np.nan_to_num(np.asarray(labels, np.float64), nan=0.0) > 0.5
    n = len(positives)
    if not 2 <= k <= n:
        raise ValueError(f"{k} folds need between 2 and {n} cases")
    rng = np.random.default_rng(seed)
    fold = np.full(n, -1)
    wanted_cases = np.full(k, n / k)
    wanted = np.outer(positives.sum(axis=0), np.full(k, 1 / k))  # (L, k)
    while (fold < 0).any():
        open_cases = fold < 0
        remaining = positives[open_cases].sum(axis=0)
        if remaining.any():
            label = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
            members = np.flatnonzero(open_cases & positives[:, label])
        else:
            label, members = -1, np.flatnonzero(open_cases)
        for case in rng.permutation(members):
            need = wanted[label] if label >= 0 else wanted_cases
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:
                best = best[wanted_cases[best] == wanted_cases[best].max()]
            chosen = int(rng.choice(best))
            fold[case] = chosen
            wanted[positives[case], chosen] -= 1
            wanted_cases[chosen] -= 1
    return fold


def one_hot(classes: np.ndarray, count: int) -> np.ndarray:
    """(n, count) 1 / 0 of class indices (-1: none)."""
    out = np.zeros((len(classes), count))
    known = classes >= 0
    out[np.flatnonzero(known), classes[known]] = 1.0
    return out


def grouped_folds(classes: np.ndarray, groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """The fold of each cell, whole groups (patients, images) at a time: the groups are
    stratified by which classes they hold (``stratified_folds`` on the groups), so no
    group is ever on both sides of a split. ``classes``: (n,) class index per cell."""
    names, group_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    holds = np.zeros((len(names), int(classes.max()) + 1 if len(classes) else 0))
    holds[group_of, classes] = 1.0
    return stratified_folds(holds, k, seed)[group_of]
