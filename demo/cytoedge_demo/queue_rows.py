"""The demo's scored cases as rows of the job store, so that the window lists them.

``cytoedge demo`` scores its scans the way ``cytoedge score`` does, outside the
service; ``record_demo_cases`` then records each case through the store's own
API (``JobStore.record_finished_case``) with the states and reasons the worker
would have given it: a result with calls is done, one where no call was
possible is rejected with its result folder, and a case whose every input the
reader refused is rejected with the reader's reasons.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from appliance.cli.score_command import ScoreRun
from appliance.service.engine import qc_rejection
from appliance.service.store import (
    DONE,
    REJECTED,
    FinishedSlide,
    JobStore,
    store_path,
)
from appliance.service.worker import CaseOutcome, with_left_out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def record_demo_cases(
    state_dir: Path, groups: Sequence[tuple[str, Sequence[Path]]], run: ScoreRun
) -> None:
    """Record each group of ``run`` (a case of ``groups``) in the job store of ``state_dir``."""
    scored = {case.case_id: case for case in run.cases}
    refused = {str(path): reason for path, reason in run.rejected}
    store = JobStore(store_path(state_dir))
    try:
        for case_key, paths in groups:
            left_out = [(Path(p).name, refused[str(p)]) for p in paths if str(p) in refused]
            slides = [
                FinishedSlide(str(p), REJECTED, reason=refused[str(p)], mtime=_mtime(Path(p)))
                for p in paths
                if str(p) in refused
            ]
            case = scored.get(case_key)
            if case is None:  # the reader refused every input: no result
                store.record_finished_case(
                    case_key, slides, state=REJECTED,
                    reason="; ".join(f"{name}: {why}" for name, why in left_out),
                    result_version=None, result_dir="", bundle_hash="", now=time.time(),
                )  # fmt: skip
                continue
            for slide in case.slides:
                rejection = qc_rejection(slide)
                slides.append(
                    FinishedSlide(
                        str(slide.path), REJECTED if rejection else DONE,
                        fingerprint=slide.fingerprint, reason=rejection, n_cells=slide.n_cells,
                        size=slide.scan.bytes, mtime=_mtime(slide.path),
                    )
                )  # fmt: skip
            outcome = CaseOutcome.from_result(case.result, case.folder.path)
            store.record_finished_case(
                case_key,
                slides,
                state=outcome.state,
                reason=with_left_out(outcome.reason, left_out),
                result_version=outcome.version,
                result_dir=str(outcome.result_dir),
                bundle_hash=case.result.bundle.sha256,
                now=time.time(),
                written_by=outcome.bundle,
                backend=outcome.backend,
            )
    finally:
        store.close()
