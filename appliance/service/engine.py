"""The real slide pipeline behind the worker's ``Engine`` seam."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from appliance.config import Config
from appliance.pipeline import slide_cache
from appliance.pipeline.cases import score_case
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.readers import scan_fingerprint
from appliance.service.worker import CaseOutcome, ProgressFn, SlideOutcome
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle


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

    def score_case(
        self, case_key: str, slides: Sequence[object], outbox: Path, progress: ProgressFn
    ) -> CaseOutcome:
        results = [s for s in slides if isinstance(s, SlideResult)]
        case = score_case(
            case_key,
            results,
            self.bundle,
            outbox,
            settings=self.settings,
            progress=progress,
        )
        return CaseOutcome.from_result(case.result, case.folder.path)

    def close(self) -> None:
        """The worker calls this on its own thread as it ends."""
        self.networks.close()
