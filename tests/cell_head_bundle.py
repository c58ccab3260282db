"""A bundle with a cell head, made from another for tests of serving: a small
``CellHeadNet`` fitted to split reference embeddings along their first principal
axis, exported through the real gate, over a taxonomy of two classes (plasma cells
and the rest). Its calls mean nothing about cells; what the tests check is that every
part serves them as the head gives them (cells near the split come out unsure)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.cell_head import CellHeadConfig, CellHeadNet, cell_head_spec, export_cell_head_member
from runtime.bundle_format import Bundle, load_bundle, write_bundle
from runtime.taxonomy import CellClass, Taxonomy

TWO_CLASSES = Taxonomy(
    name="plasma-or-not",
    title="Plasma cells and the rest",
    classes=(
        CellClass("plasma_cell", "Plasma cell", ("lymphoid", "plasmacytic"), (0, 120, 60)),
        CellClass("other_cell", "Other cell", ("other",), (150, 150, 150)),
    ),
    groups={"plasma_cells": ("plasma_cell",)},
)


# Fitted heads by (reference digest, seed, steps): the fit is deterministic and costs
# tens of seconds on CI's two cores, and a module makes many bundles from one reference.
_FITTED: dict[tuple[str, int, int], CellHeadNet] = {}


def fitted_head(reference: np.ndarray, seed: int = 0, steps: int = 150) -> CellHeadNet:
    """A head that calls a cell "plasma" when it lies on the far side of the median
    along the reference embeddings' first principal axis; fitted once per process for
    the same reference, seed and steps, and each caller gets its own copy."""
    digest = hashlib.sha256(np.ascontiguousarray(reference).tobytes())
    digest.update(f"{reference.shape}{reference.dtype}".encode())
    key = (digest.hexdigest(), seed, steps)
    if key not in _FITTED:
        _FITTED[key] = _fit(reference, seed, steps)
    return copy.deepcopy(_FITTED[key])


def _fit(reference: np.ndarray, seed: int, steps: int) -> CellHeadNet:
    centred = reference - reference.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    labels = (centred @ axis > np.median(centred @ axis)).astype(np.int64)
    torch.manual_seed(seed)
    net = CellHeadNet(CellHeadConfig(in_dim=reference.shape[1], classes=2, dropout=0.0))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(reference.astype(np.float32)), torch.from_numpy(1 - labels)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    return net.eval()


def with_cell_head(
    base_path: Path,
    destination: Path,
    reference: np.ndarray,
    *,
    seed: int = 0,
    operating_point: float = 0.55,
    bag_classes: tuple[str, ...] = (),
    plasma_rule: str = "warn",
    min_plasma_fraction: float = 0.10,
    budget_per_slide: int | None = None,
) -> Bundle:
    """``base`` with a cell head fitted on ``reference`` embeddings; its scan head reads
    ``bag_classes`` (empty: every cell)."""
    base = load_bundle(base_path)
    net = fitted_head(reference, seed)
    work = destination.parent / f".{destination.name}-work"
    member = work / "cells" / "cell_head_0.onnx"
    export_cell_head_member(net, member, TWO_CLASSES, 0, 1)
    spec = cell_head_spec(
        "cells",
        ["cells/cell_head_0.onnx"],
        TWO_CLASSES,
        temperature=1.0,
        operating_point=operating_point,
        target_accuracy=0.99,
        coverage=None,
    )
    heads = tuple(
        dataclasses.replace(h, bag_classes=bag_classes) if "scans" in h.inputs else h
        for h in base.heads
    )
    head_files = {rel for h in base.heads for rel in h.files}
    sources = {rel: base.file(rel) for rel in base.files}
    sources["cells/cell_head_0.onnx"] = member
    cells = base.cells
    if budget_per_slide is not None:
        cells = dataclasses.replace(cells, max_cells_per_slide=budget_per_slide)
    assert head_files <= set(sources)
    return write_bundle(
        destination,
        name=base.name,
        version=f"{base.version}-cells",
        intended_use=base.intended_use,
        sources=sources,
        encoder=base.encoder,
        heads=heads,
        segmenter=base.segmenter,
        cell_head=spec,
        stain_reference=base.stain_reference,
        qc=dataclasses.replace(
            base.qc,
            plasma_cell_rule=plasma_rule,  # type: ignore[arg-type]
            min_plasma_cell_fraction=min_plasma_fraction,
        ),
        cells=cells,
        provenance={"test": "a seeded random cell head over the tiny bundle"},
    )


def without_cell_head(base_path: Path, destination: Path) -> Bundle:
    """``base`` as a bundle whose case heads read every cell and that has no cell head."""
    base = load_bundle(base_path)
    dropped = set(base.cell_head.files) if base.cell_head is not None else set()
    return write_bundle(
        destination,
        name=base.name,
        version=f"{base.version}-no-cells",
        intended_use=base.intended_use,
        sources={rel: base.file(rel) for rel in base.files if rel not in dropped},
        encoder=base.encoder,
        heads=[dataclasses.replace(h, bag_classes=()) for h in base.heads],
        segmenter=base.segmenter,
        stain_reference=base.stain_reference,
        qc=base.qc,
        cells=base.cells,
        provenance={"test": "the tiny bundle without its cell head"},
    )
