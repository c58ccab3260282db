"""The real slide pipeline behind the worker's ``Engine`` seam, and what a slide will
take of the data disk (the service waits for that room rather than start a slide it
cannot finish)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from appliance.config import Config
from appliance.pipeline import slide_cache
from appliance.pipeline.cases import score_case
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.patients import site_case_index
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.pipeline.tiles import TILE_PX
from appliance.readers import probe, scan_fingerprint
from appliance.readers.base import ScanInfo
from appliance.readers.errors import ScanError
from appliance.results.case_index import CaseIndex
from appliance.service.worker import CaseOutcome, ProgressFn, SlideOutcome
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle, CellsSpec

# Kept cells a 200 um tile (or a field photo) can give, at most: a dense marrow
# smear's tiles give a few dozen.
CELLS_PER_TILE = 100
# Per slide, beside its cells: the cache entry's thumbnail and tables, the job store,
# audit and log lines.
SLIDE_MARGIN_BYTES = 4_000_000


def qc_rejection(result: SlideResult) -> str:
    """Why a processed slide gives the case no cells ("" when its QC passed)."""
    return "" if result.qc_passed else f"slide QC failed: {result.qc_reason or 'no reason'}"


class PipelineEngine:
    """``appliance.pipeline.slides.process_slide`` / ``appliance.pipeline.cases.score_case``
    with the site's settings."""

    def __init__(self, config: Config, bundle: Bundle, settings: RuntimeSettings) -> None:
        self.config = config
        self.bundle = bundle
        self.settings = settings
        # One encoder and one segmenter session for the engine's life, opened on first use.
        self.networks = SlideNetworks(bundle, settings)
        self._case_index: CaseIndex | None = None  # opened by the first case scored

    def process_slide(
        self, path: Path, progress: ProgressFn, *, use_cache: bool, fingerprint: str | None = None
    ) -> SlideOutcome:
        cfg = self.config
        if not use_cache:  # a re-score asked for: the slide is processed from scratch
            fingerprint = fingerprint or scan_fingerprint(path)
            entry = slide_cache.entry_dir(cfg.cache_dir, fingerprint, self.bundle.slide_sha256)
            shutil.rmtree(entry, ignore_errors=True)
        result = process_slide(
            path,
            self.networks,
            cache_dir=cfg.cache_dir,
            calibration=cfg.calibration,
            progress=progress,
            fingerprint=fingerprint,
        )
        return SlideOutcome(
            handle=result,
            n_cells=result.n_cells,
            rejected_reason=qc_rejection(result),
            backend=result.backend,
        )

    def space_needed(self, path: Path) -> int:
        """About how many bytes of the data disk processing ``path`` takes."""
        try:
            info = probe(path, self.config.calibration)
        except (ScanError, OSError):
            return SLIDE_MARGIN_BYTES  # the job itself says what is wrong with the input
        return slide_bytes(info, self.bundle)

    def score_case(
        self, case_key: str, slides: Sequence[object], outbox: Path, progress: ProgressFn
    ) -> CaseOutcome:
        results = [s for s in slides if isinstance(s, SlideResult)]
        if self._case_index is None:
            self._case_index = site_case_index(self.bundle, self.config.data_dir, outbox)
        case = score_case(
            case_key,
            results,
            self.bundle,
            outbox,
            settings=self.settings,
            progress=progress,
            case_index=self._case_index,
        )
        return CaseOutcome.from_result(case.result, case.folder.path)

    def close(self) -> None:
        """The worker calls this on its own thread as it ends."""
        self.networks.close()


def most_cells(info: ScanInfo, cells: CellsSpec) -> int:
    """The most kept cells a slide can give: its crops (a cell folder), else its tiles
    or photos times ``CELLS_PER_TILE``, within the bundle's budget per slide."""
    if info.format == "cells":
        return info.width
    if info.format == "fields":
        bound = info.width * CELLS_PER_TILE
    else:
        bound = -(-info.width // TILE_PX) * -(-info.height // TILE_PX) * CELLS_PER_TILE
    return min(bound, cells.max_cells_per_slide) if cells.max_cells_per_slide else bound


def slide_bytes(info: ScanInfo, bundle: Bundle) -> int:
    """Each kept cell's crop twice (the spool while the slide is embedded, then the
    cache entry: ``appliance.pipeline.embedding_sink``, ``slide_cache``) and its
    embedding, plus ``SLIDE_MARGIN_BYTES``."""
    patch = bundle.cells.patch_px**2 * 3
    per_cell = 2 * patch + 4 * bundle.encoder.embed_dim + 256  # 256: its table rows
    return most_cells(info, bundle.cells) * per_cell + SLIDE_MARGIN_BYTES
