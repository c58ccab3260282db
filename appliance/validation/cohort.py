"""A labelled cohort through the appliance's own slide pipeline.

``cytoedge train`` and ``cytoedge validate`` both process a cases table's scans
with ``appliance.pipeline.slides.process_slide`` and the bundle's shared sessions, the
same code and slide cache as ``cytoedge score`` and the service: a scan embedded
once (for any bundle with the same encoder and segmenter) is read back from the
cache, so a table run again costs only its new scans. A scan that cannot be read
is listed with its reason, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from appliance.config import Config
from appliance.console import OUT_OF_MEMORY, new_progress
from appliance.pipeline.bags import head_bag
from appliance.pipeline.cases import abstain_reason
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.readers import Calibration, ScanError
from appliance.validation.cases_table import CasesTable, LabelledCase
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle


@dataclass(frozen=True)
class PipelineSettings:
    """Where processed slides are cached and how the networks run: a site's
    configuration, or a build's own folder."""

    cache_dir: Path
    runtime: RuntimeSettings
    # For images without a pixel size: config scan.* and [cameras.*], or um/px alone.
    calibration: Calibration | float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> PipelineSettings:
        return cls(config.cache_dir, config.runtime.settings, config.calibration)


@dataclass(frozen=True)
class CohortCase:
    """One row of the table after its scans went through the pipeline."""

    case: LabelledCase
    slides: tuple[SlideResult, ...]
    rejected: tuple[tuple[Path, str], ...]  # (scan, the reader's reason)

    @property
    def case_id(self) -> str:
        return self.case.case_id

    def left_out(self, min_cells: int) -> str | None:
        """Why no head can use this case (as scoring it would abstain), or None."""
        if not self.slides:
            return "every scan was rejected: " + "; ".join(
                f"{path.name}: {reason}" for path, reason in self.rejected
            )
        failures = [f"{s.slide_id}: {s.qc_reason}" for s in self.slides if not s.qc_passed]
        cells = sum(s.n_cells for s in self.slides if s.qc_passed)
        return abstain_reason(cells, min_cells, failures, len(self.slides), [])

    def bag(self, bundle: Bundle, bag_classes: Sequence[str] = ()) -> np.ndarray:
        """The embeddings a head of ``bundle`` that reads ``bag_classes`` (none: every
        kept cell) sees, as scoring takes them (``pipeline.bags.head_bag``)."""
        kept = {s.slide_id: s.cells() for s in self.slides if s.qc_passed}
        return head_bag(bundle, kept, bag_classes)


def process_cohort(
    table: CasesTable,
    networks: SlideNetworks,
    pipeline: PipelineSettings,
    console: Console,
    cases: Sequence[LabelledCase] | None = None,
) -> list[CohortCase]:
    """Every scan of every case (or of ``cases``) processed or read from the cache.

    One bar for the cohort, and one for the case in progress showing its scan and
    stage; the finished case's bar gives way to the next.
    """
    todo = list(table.cases if cases is None else cases)
    done: list[CohortCase] = []
    with new_progress(console) as progress:
        overall = progress.add_task(f"{len(todo)} cases", total=len(todo))
        for case in todo:
            done.append(_process_case(case, networks, pipeline, progress))
            progress.advance(overall)
    return done


def _process_case(
    case: LabelledCase, networks: SlideNetworks, pipeline: PipelineSettings, progress: Progress
) -> CohortCase:
    label = f"case {case.case_id[:24]}"
    current = progress.add_task(label, total=len(case.scans))
    slides: list[SlideResult] = []
    rejected: list[tuple[Path, str]] = []
    for index, path in enumerate(case.scans):

        def report(stage: str, fraction: float, index: int = index) -> None:
            completed = index + max(0.0, min(1.0, fraction))
            progress.update(current, completed=completed, description=f"{label}: {stage}")

        try:
            slides.append(
                process_slide(
                    path,
                    networks,
                    cache_dir=pipeline.cache_dir,
                    calibration=pipeline.calibration,
                    progress=report,
                )
            )
        except ScanError as exc:
            rejected.append((path, exc.reason))
        except MemoryError:  # the machine's limit, not the file's
            rejected.append((path, OUT_OF_MEMORY))
    progress.remove_task(current)
    return CohortCase(case, tuple(slides), tuple(rejected))
