"""Which kept cells a case head reads: the classes of its bag, and the case's budget.

A head reads every kept cell of the case's slides that passed QC, or, when the
bundle restricts its bag (``HeadSpec.bag_classes``: plasma cells for a myeloma head,
white cells for a blood head), those the cell head put in one of its classes. The
case's budget (``cells.max_cells_per_case``) then caps the bag: each slide gives an
equal share, the first of its cells in the order its visit kept them (best tiles,
spread over the zone). Scoring, ``cytoedge train`` and ``cytoedge validate`` all take
a head's bag from here, so the heads learn on the bags they will score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from appliance.pipeline.slide_cache import SlideCells
from runtime.bundle_format import Bundle, HeadSpec


def case_shares(counts: Sequence[int], budget: int) -> list[int]:
    """How many of each slide's cells go into the case's bag.

    All of them when they fit in ``budget`` (0: no budget); else an equal share each,
    a slide with fewer cells giving all it has and its unused share going to the others.
    """
    if budget <= 0 or sum(counts) <= budget:
        return list(counts)
    shares = [0] * len(counts)
    left = budget
    by_size = sorted(range(len(counts)), key=lambda index: counts[index])
    for done, index in enumerate(by_size):
        shares[index] = min(counts[index], left // (len(by_size) - done))
        left -= shares[index]
    return shares


def class_indices(bundle: Bundle, names: Sequence[str]) -> tuple[int, ...] | None:
    """The cell head's output indices of ``names``; None (every cell) when empty."""
    if not names:
        return None
    return tuple(bundle.cell_classes.index(name) for name in names)


def eligible(cells: SlideCells, classes: tuple[int, ...] | None) -> np.ndarray:
    """Indices of a slide's kept cells of ``classes`` (all of them for None)."""
    if classes is None:
        return np.arange(len(cells.embeddings))
    return np.flatnonzero(np.isin(cells.classes(), classes))


def bag_indices(
    kept: Mapping[str, SlideCells], budget: int, classes: tuple[int, ...] | None
) -> dict[str, np.ndarray]:
    """By slide id, the indices of the slide's kept cells in a head's bag: the first of
    its cells of ``classes``, its share of ``budget``. The shares depend on the case's
    slides only, not on the order they arrived in, so a re-score after a late slide
    gives what scoring all of them at once gives."""
    candidates = {slide_id: eligible(cells, classes) for slide_id, cells in kept.items()}
    by_id = sorted(candidates)  # equal slides share the remainder the same way in any order
    shares = case_shares([len(candidates[slide_id]) for slide_id in by_id], budget)
    return {
        slide_id: candidates[slide_id][:share]
        for slide_id, share in zip(by_id, shares, strict=True)
    }


def head_bag(
    bundle: Bundle, kept: Mapping[str, SlideCells], bag_classes: Sequence[str]
) -> np.ndarray:
    """A head's bag as one (N, D) array, slides in ``kept``'s order: what it is trained,
    validated and scored on."""
    indices = bag_indices(kept, bundle.cells.max_cells_per_case, class_indices(bundle, bag_classes))
    parts = [cells.embeddings[indices[slide_id]] for slide_id, cells in kept.items()]
    if not parts:
        return np.zeros((0, bundle.encoder.embed_dim), np.float32)
    return np.concatenate(parts)


class CaseBag:
    """The cells the case's heads read: each head's bag (``bag_indices``) and their union,
    in slide order; the attention each head gives its bag is spread back over the union
    and averaged over the heads that read each cell."""

    def __init__(
        self,
        kept: Mapping[str, SlideCells],
        indices: dict[str, dict[str, np.ndarray]],
        candidates: dict[str, np.ndarray],
    ) -> None:
        self.kept = kept
        self.indices = indices  # by head, by slide: indices into the slide's kept cells
        self.candidates = candidates  # by slide: kept cells of any head's classes
        self.union = {
            sid: np.unique(np.concatenate([bag[sid] for bag in indices.values()])) for sid in kept
        }
        starts = np.cumsum([0, *(len(u) for u in self.union.values())])
        self.start = dict(zip(self.union, starts[:-1].tolist(), strict=True))
        self.size = int(starts[-1])
        self._sum = np.zeros(self.size, np.float64)
        self._heads = np.zeros(self.size, np.int64)

    @classmethod
    def of(
        cls, bundle: Bundle, kept: Mapping[str, SlideCells], heads: Sequence[HeadSpec]
    ) -> CaseBag:
        """The bags of ``heads``; without heads, every kept cell within the case's budget
        (what the result's tables then hold)."""
        budget = bundle.cells.max_cells_per_case
        wanted = [class_indices(bundle, h.bag_classes) for h in heads] or [None]
        names = [h.name for h in heads] or [""]
        indices = {
            name: bag_indices(kept, budget, classes)
            for name, classes in zip(names, wanted, strict=True)
        }
        candidates = {
            sid: np.unique(np.concatenate([eligible(cells, classes) for classes in wanted]))
            for sid, cells in kept.items()
        }
        return cls(kept, indices, candidates)

    @property
    def sizes(self) -> dict[str, int]:
        """The cells of each head's bag (what ``cells.min_cells`` is held to)."""
        return {head: sum(len(i) for i in bag.values()) for head, bag in self.indices.items()}

    @property
    def smallest(self) -> int:
        return min(self.sizes.values(), default=0)

    def features(self, head: str) -> np.ndarray:
        """A head's bag (N, D), slides in the case's order."""
        return np.concatenate(
            [cells.embeddings[self.indices[head][sid]] for sid, cells in self.kept.items()]
        )

    def positions(self, head: str) -> np.ndarray:
        """Where a head's bag sits in the union, in its own order."""
        parts = [
            self.start[sid] + np.searchsorted(self.union[sid], self.indices[head][sid])
            for sid in self.kept
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def add_attention(self, head: str, attention: np.ndarray) -> None:
        where = self.positions(head)
        self._sum[where] += attention
        self._heads[where] += 1

    def attention(self) -> np.ndarray:
        """(union,) float32: the mean over the heads that read each cell."""
        return (self._sum / np.maximum(self._heads, 1)).astype(np.float32)

    def owner(self, position: int) -> tuple[str, int]:
        """(slide id, index among its kept cells) of a place in the union."""
        for sid, start in self.start.items():
            if start <= position < start + len(self.union[sid]):
                return sid, int(self.union[sid][position - start])
        raise IndexError(position)
