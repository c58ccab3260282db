"""Kept cells embedded (and classified, when the bundle has a cell head) in chunks as a
slide yields them, their crops spooled to disk.

Memory holds one chunk of crops, never a slide's worth: the scan path and the field
path both hand their cells to a ``CellSink`` and take the slide's cells, embeddings,
class probabilities and crops (memory-mapped from the spool) from it at the end.
A scan's visit asks it how many cells count toward the slide's budget: every kept
cell, or only those of the classes its heads read (``Bundle.budget_classes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from appliance.pipeline.cells import Cell, encoder_patches
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.progress import StageTimer

EMBED_CHUNK = 256  # kept cells embedded at a time


class CellSink:
    """Where a slide's kept cells go to be embedded; ``spool`` holds their crops."""

    def __init__(
        self,
        networks: SlideNetworks,
        patch_px: int,
        spool: Path,
        timer: StageTimer,
        budget_classes: tuple[str, ...] = (),
    ) -> None:
        self.networks, self.patch_px, self.timer = networks, patch_px, timer
        self.size = networks.bundle.encoder.input.fed_px
        self.spool = spool
        self.spool_file = open(spool, "wb")  # noqa: SIM115 - closed in finish() / discard()
        self.pending: list[Cell] = []
        self.done: list[Cell] = []
        self.embeddings: list[np.ndarray] = []
        self.probabilities: list[np.ndarray] = []
        cell_head = networks.bundle.cell_head
        classes = cell_head.outputs if cell_head is not None else ()
        self.counted_classes = [classes.index(name) for name in budget_classes]
        self.in_classes = 0  # embedded cells of the counted classes

    @property
    def count(self) -> int:
        """Every kept cell so far."""
        return len(self.done) + len(self.pending)

    def counted(self, budget: int) -> int:
        """The cells that count toward a budget of ``budget`` (0: none, the count at the
        end of a visit): every kept cell, or those of the counted classes (the waiting
        ones classified first when they could reach the budget)."""
        if not self.counted_classes:
            return self.count
        if self.pending and (budget <= 0 or self.in_classes + len(self.pending) >= budget):
            self._flush()
        return self.in_classes

    def add(self, cells: Sequence[Cell]) -> None:
        self.pending.extend(cells)
        if len(self.pending) >= EMBED_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        with self.timer.stage("embed"):
            self.spool_file.write(np.stack([c.patch for c in self.pending]).tobytes())
            embeddings = self.networks.embed(
                encoder_patches(self.pending, self.size), progress=_ignore
            )
            self.embeddings.append(embeddings)
        with self.timer.stage("classify"):
            probabilities = self.networks.classify(embeddings)
        self.probabilities.append(probabilities)
        if self.counted_classes:
            self.in_classes += int(np.isin(probabilities.argmax(1), self.counted_classes).sum())
        for cell in self.pending:
            cell.patch = None  # the spool holds it now
        self.done.extend(self.pending)
        self.pending = []
        self.timer.progress("embed", 1.0)

    def finish(self) -> tuple[list[Cell], np.ndarray, np.ndarray, np.ndarray]:
        """(cells, embeddings (N, D), class probabilities (N, C), crops (N, s, s, 3)
        memory-mapped from the spool)."""
        self._flush()
        self.spool_file.close()
        shape = (len(self.done), self.patch_px, self.patch_px, 3)
        patches = np.memmap(self.spool, dtype=np.uint8, mode="r", shape=shape)
        return (
            self.done,
            np.concatenate(self.embeddings),
            np.concatenate(self.probabilities),
            patches,
        )

    def discard(self) -> None:
        self.spool_file.close()


def _ignore(done: int, total: int) -> None:
    """Chunks are small; the sink reports progress per chunk."""
