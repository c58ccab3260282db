"""What the scan path and the field path share: the bundle's slide parameters on the
working grid, the thumbnail's scale, and StarDist over one window to the kept cells.

A window is a tile with its margins (``pipeline.scans``) or part of a field photo
(``pipeline.fields``); a cell belongs to the window whose core holds its centre, so
cells on a seam are counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.pipeline import qc, stain
from appliance.pipeline.cells import Cell, CellFilters, measure_cells
from appliance.pipeline.progress import StageTimer
from appliance.pipeline.segmentation import Segmenter
from appliance.pipeline.slide_cache import THUMBNAIL_LONG_SIDE
from appliance.readers.base import TARGET_UM_PER_PX
from runtime.bundle_format import Bundle, StainReference


@dataclass(frozen=True)
class SlideParams:
    """A bundle's stain reference, QC thresholds and cell filters, at 0.25 um/px."""

    reference: StainReference | None
    qc: qc.QCParams
    filters: CellFilters

    @classmethod
    def of(cls, bundle: Bundle) -> SlideParams:
        return cls(
            reference=bundle.stain_reference,
            qc=qc.QCParams.of(bundle.qc, bundle.stain_reference),
            filters=CellFilters.of(bundle.cells).at(TARGET_UM_PER_PX),
        )

    def nuclei_stains(self, slide_stains: stain.StainEstimate) -> stain.StainEstimate:
        """Nuclei are found on normalised pixels, whose stains are the reference's."""
        if self.reference is None:
            return slide_stains
        return stain.reference_stains(self.reference)

    def normalised(self, rgb: np.ndarray, slide_stains: stain.StainEstimate) -> np.ndarray:
        """``rgb`` in the reference's stains (as it is without a reference)."""
        if self.reference is None:
            return rgb
        return stain.normalize(rgb, slide_stains, self.reference)


def thumbnail_grid(width: int, height: int) -> tuple[float, float]:
    """(um per thumbnail pixel, working-grid pixels per thumbnail pixel) for a slide of
    ``width`` x ``height`` working-grid pixels: at most ``THUMBNAIL_LONG_SIDE`` on its
    long side, never finer than the grid."""
    long_side_um = max(width, height) * TARGET_UM_PER_PX
    thumb_um = max(TARGET_UM_PER_PX, long_side_um / THUMBNAIL_LONG_SIDE)
    return thumb_um, thumb_um / TARGET_UM_PER_PX


def cells_in_window(
    window: np.ndarray,
    core: tuple[int, int, int, int],
    segmenter: Segmenter,
    stains: stain.StainEstimate,
    params: SlideParams,
    timer: StageTimer,
    *,
    origin: tuple[int, int],
    tile_id: int,
) -> list[Cell]:
    """StarDist objects of a normalised ``window`` whose centre lies in ``core`` (top,
    left, bottom, right in window pixels) -> the cells that pass the filters, placed
    at ``origin`` (the window's top-left in the slide's working grid)."""
    with timer.stage("segment"):
        detections = segmenter.detect(window, core=core)
    if not len(detections):
        return []
    with timer.stage("cells"):
        basophilic, share = stain.basophilic_and_share(window, stains)
        return measure_cells(
            detections,
            window,
            basophilic,
            params.filters,
            origin=origin,
            tile_id=tile_id,
            background=stains.background,
            min_basophilic=params.qc.min_basophilic,  # the QC's "no nucleus at all" level
            basophilic_share=share,  # a red cell's darker rim is eosin, not a nucleus
        )
