"""Crops around places a person marked on a photo or a scan, cut the way the pipeline
cuts a kept cell's: at the 0.25 um/px working grid, ``cells.patch_px`` square, a photo
white-balanced from its own glass (``pipeline.fields``), stain-normalised to the
bundle's reference with the slide's own stains (a photo's from itself, a scan's from
tiles spread over its cellular zone, ``pipeline.scans.scan_stains``) and padded with
the glass the pipeline pads with.

``cytoedge train`` takes these for labelled points that no kept cell holds (red cells,
platelets, cells the segmenter or the cell filters set aside), so that a cell head
learns them from the pixels serving would have cut. When the slide's stains cannot
be estimated (a photo of red cells only holds no nucleus to find the basophilic
stain from), the crops are cut without stain normalisation and ``stains_note`` says
why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.pipeline import stain, tiles
from appliance.pipeline.cell_finding import SlideParams
from appliance.pipeline.cells import crop_patch
from appliance.pipeline.fields import glass_target, read_field, survey, white_balanced
from appliance.pipeline.scans import scan_stains
from appliance.readers import (
    TARGET_UM_PER_PX,
    Calibration,
    Scan,
    is_field_file,
    open_scan,
    single_field,
)
from runtime.bundle_format import Bundle


class PointCropper:
    """Crops of one photo or scan around points given in its file's pixels (a scan:
    level 0). Holds one photo at the working grid, or the scan open; ``close`` it."""

    def __init__(self, path: Path, bundle: Bundle, calibration: Calibration | float) -> None:
        self.params = SlideParams.of(bundle)
        self.side = self.params.filters.patch_px
        self.stains_note: str | None = None  # why the crops are not stain-normalised
        self._image: np.ndarray | None = None
        self._scan: Scan | None = None
        self._stains: stain.StainEstimate | None = None
        if is_field_file(path):
            self._open_photo(path, calibration)
        else:
            self._open_scan(path, calibration)

    def _estimated(self, estimate: Callable[[], stain.StainEstimate]) -> stain.StainEstimate | None:
        try:
            return estimate()
        except stain.StainError as exc:
            self.stains_note = exc.reason
            return None

    def _fill(self, stains: stain.StainEstimate | None) -> np.ndarray:
        """The colour beyond the image: the glass cells are padded with."""
        if stains is None:
            return np.asarray(glass_target(self.params.reference), np.float32)
        return self.params.nuclei_stains(stains).background

    def _open_photo(self, path: Path, calibration: Calibration | float) -> None:
        folder = single_field(path, calibration)
        target = glass_target(self.params.reference)
        infos, samples = survey(folder, target)
        stains = self._estimated(lambda: stain.estimate_stains(samples))
        rgb, info = read_field(folder, 0)
        image = white_balanced(rgb, info.taken.glass, target)
        self._image = image if stains is None else self.params.normalised(image, stains)
        self._stains = stains
        self.scale = infos[0].pixel_size_um / TARGET_UM_PER_PX
        self.fill = self._fill(stains)

    def _open_scan(self, path: Path, calibration: Calibration | float) -> None:
        self._scan = scan = open_scan(path, calibration)
        grid = tiles.tile_grid(scan, tiles.cellular_zone(scan))
        self._stains = self._estimated(lambda: scan_stains(scan, grid))
        self.scale = scan.info().pixel_size_um / TARGET_UM_PER_PX
        self.fill = self._fill(self._stains)

    def crop(self, x: float, y: float) -> np.ndarray:
        """(patch_px, patch_px, 3) uint8 centred on the file's pixel (x, y)."""
        col, row = x * self.scale, y * self.scale
        if self._image is not None:
            return crop_patch(self._image, row, col, self.side, self.fill)
        assert self._scan is not None
        # A window twice the crop's side around it: the crop's pixels, read and normalised.
        left, top = int(np.floor(col)) - self.side, int(np.floor(row)) - self.side
        window = self._scan.read_region(left, top, 2 * self.side, 2 * self.side)
        if self._stains is not None:
            window = self.params.normalised(window, self._stains)
        return crop_patch(window, row - top, col - left, self.side, self.fill)

    def close(self) -> None:
        if self._scan is not None:
            self._scan.close()
            self._scan = None

    def __enter__(self) -> PointCropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
