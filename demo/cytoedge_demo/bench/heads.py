"""``cytoedge bench heads``: what training the heads costs on cached embeddings.

Synthetic bags (embedding-like: a shared offset per bag plus spread, a planted
signal) of a cohort of N cases for each kind: the myeloma head on bags of
``--mm-cells`` 384-d cells, the blood head on bags of ``--pb-cells``. One
cross-validation member is trained per kind for ``--epochs`` epochs (no early
stop), first on torch's default threads (the baseline), then on the recipe's
(one); seconds per epoch, the ratio, and the projected k-fold training at the
recipe's epochs.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from cytoedge_demo.bench.gemm import cpu_description
from export.train_gated import GatedObjective
from export.train_heads import Objective, torch_threads, train_member
from export.train_transformer import TransformerObjective
from runtime.head_kinds import Truth


def _bags(rng: np.random.Generator, n: int, cells: int, dim: int) -> list[np.ndarray]:
    return [
        (rng.normal(size=dim) + rng.normal(size=(cells, dim))).astype(np.float32) for _ in range(n)
    ]


def _cohort(objective: Objective, n: int, cells: int, dim: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    bags = _bags(rng, n, cells, dim)
    if isinstance(objective, GatedObjective):
        labels = rng.integers(0, 2, (n, len(objective.tasks)))
        truths = [Truth(dict(zip(objective.tasks, map(bool, row), strict=True))) for row in labels]
    else:
        classes = objective.classes
        truths = [Truth({}, classes[i % len(classes)], {"hemoglobin": 12.0}) for i in range(n)]
    return bags, objective.targets(truths)


def _seconds_per_epoch(objective: Objective, bags: list, targets: dict, threads: int) -> float:
    with torch_threads(threads):
        started = time.perf_counter()
        train_member(objective, bags, targets, [], {}, seed=0)
        return (time.perf_counter() - started) / objective.recipe.epochs


def run_heads_bench(cases: int, mm_cells: int, pb_cells: int, epochs: int, folds: int) -> None:
    print(f"{cpu_description()}; torch {torch.__version__}")
    print(f"{cases} cases, {epochs} epochs per member, one member of {folds} folds timed")
    default_threads = torch.get_num_threads()
    for objective, cells in ((GatedObjective(), mm_cells), (TransformerObjective(), pb_cells)):
        full_epochs = objective.recipe.epochs
        objective.recipe = dataclasses.replace(objective.recipe, epochs=epochs)
        bags, targets = _cohort(objective, cases * (folds - 1) // folds, cells, 384, seed=1)
        baseline = _seconds_per_epoch(objective, bags, targets, default_threads)
        recipe = _seconds_per_epoch(objective, bags, targets, objective.recipe.threads)
        projected = recipe * full_epochs * folds
        print(
            f"{objective.kind} ({cells} cells per bag): {default_threads} threads "
            f"{baseline:.2f} s/epoch (1.00x); {objective.recipe.threads} thread "
            f"{recipe:.2f} s/epoch ({baseline / recipe:.2f}x); {folds} folds x {full_epochs} "
            f"epochs at most: {projected:.0f} s"
        )
