"""Expected seconds per slide on this machine, from a short measured run of each network.

A scan's cost is its segmented tiles and its embedded cells: with the bundle's
cell budget (``cells.max_cells_per_slide``) a slide stops at ``budget`` cells,
found in about ``budget / cells_per_tile`` tiles. ``cytoedge doctor`` times the
segmenter on one whole tile and the encoder on a batch of crops (after one
untimed warm-up call each, as a running service has), and prints the estimate
against a scanner's pace, so a site knows before its first patient.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from appliance.pipeline import tiles
from appliance.pipeline.networks import SlideNetworks
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle
from runtime.parity import stained_field

# Kept cells per 200 x 200 um tile on the synthetic bench slides with the demo
# bundle (401 in 28 tiles, 405 in 24; docs/BENCHMARKS.md); a site's own slides and
# segmenter differ, so doctor says which figure it assumed.
TYPICAL_CELLS_PER_TILE = 14.0
# Reading, QC, stain work and cell measurement per tile, as a share of the
# segmenter's time on it (bench slide, 2-core CPU: 13.1 s against 14.2 s; they
# overlap the networks, but share the same cores).
OTHER_PER_TILE_SHARE = 0.9
SCANNER_SECONDS_PER_SLIDE = (120.0, 210.0)  # a marrow smear every 2-3.5 minutes
EMBED_BATCH = 16
TILE_NUCLEI = 40  # nucleated cells on the timed tile (the bench slide has 17-20 a tile)


@dataclass(frozen=True)
class PaceEstimate:
    segment_s_per_tile: float | None  # None: the bundle has no segmenter (cells only)
    embed_s_per_cell: float
    budget: int  # cells per slide; 0: no budget, the whole zone
    cells_per_tile: float = TYPICAL_CELLS_PER_TILE

    @property
    def tiles(self) -> int:
        return math.ceil(self.budget / self.cells_per_tile) if self.budget else 0

    @property
    def seconds_per_slide(self) -> float | None:
        """At the budget; None without a budget or a segmenter (no fixed slide cost)."""
        if not self.budget or self.segment_s_per_tile is None:
            return None
        per_tile = self.segment_s_per_tile * (1.0 + OTHER_PER_TILE_SHARE)
        return self.tiles * per_tile + self.budget * self.embed_s_per_cell

    def sentence(self) -> str:
        embed = f"encoder {self.embed_s_per_cell:.3f} s per cell"
        if self.segment_s_per_tile is None:
            return f"Pace: {embed} (no segmenter: cell folders only)."
        segment = f"segmenter {self.segment_s_per_tile:.2f} s per 200 um tile"
        seconds = self.seconds_per_slide
        if seconds is None:
            return (
                f"Pace: {segment}, {embed}; no cell budget, so a slide's time grows with its zone."
            )
        fast, slow = SCANNER_SECONDS_PER_SLIDE
        verdict = (
            "keeps pace with one scanner"
            if seconds <= fast
            else "keeps pace with a slow scanner only"
            if seconds <= slow
            else "slower than one scanner"
        )
        return (
            f"Pace: {segment}, {embed}; expected about {seconds:.0f} s per slide at the budget "
            f"of {self.budget} cells (assuming {self.cells_per_tile:g} kept cells per tile, "
            f"about {self.tiles} tiles): {verdict} (a slide every "
            f"{fast / 60:.0f}-{slow / 60:.1f} min)."
        )


def measure_pace(bundle: Bundle, settings: RuntimeSettings) -> PaceEstimate:
    """Time each network on a synthetic input of its real size. The segmenter's
    non-maximum suppression depends on what the network finds (noise makes it find
    thousands of candidates), so its tile is a stained field of nuclei."""
    rng = np.random.default_rng(0)
    size = bundle.encoder.input.fed_px
    crops = rng.integers(0, 256, (EMBED_BATCH, size, size, 3), dtype=np.uint8)
    with SlideNetworks(bundle, settings) as networks:
        networks.embed(crops[:2], progress=_ignore)
        started = time.perf_counter()
        networks.embed(crops, progress=_ignore)
        embed = (time.perf_counter() - started) / EMBED_BATCH
        segment = None
        if bundle.segmenter is not None:
            side = tiles.TILE_PX + 2 * tiles.DEFAULT_MARGIN_PX
            tile = stained_field(side, side, cells=TILE_NUCLEI, seed=7)
            segmenter = networks.segmenter()
            segmenter.detect(tile)
            started = time.perf_counter()
            segmenter.detect(tile)
            segment = time.perf_counter() - started
    return PaceEstimate(segment, embed, bundle.cells.max_cells_per_slide)


def _ignore(done: int, total: int) -> None:
    """Timing only: no progress to show."""
