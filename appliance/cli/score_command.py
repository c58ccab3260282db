"""What ``cytoedge score`` and ``cytoedge demo`` show: progress per stage and a short table.

Each case written goes into the audit trail as the service's cases do (a
``finished`` record with every file of the version by its hash, ``source:
score``), so ``cytoedge audit verify`` covers results scored from the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from appliance.config import Config
from appliance.console import OUT_OF_MEMORY, StageBars, new_progress
from appliance.pipeline.cases import ScoredCase, score_case
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.patients import site_case_index
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.readers import ScanError
from appliance.results import CaseResult
from appliance.service.audit import AUDIT_FILE, AuditLog, result_file_hashes
from appliance.service.service import software_version
from appliance.site.backend_check import site_settings
from runtime.bundle_format import Bundle


@dataclass
class ScoreRun:
    """The outcome of scoring some inputs: cases written and inputs rejected."""

    cases: list[ScoredCase] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)


def score_inputs(
    groups: Sequence[tuple[str, Sequence[Path]]],
    bundle: Bundle,
    config: Config,
    console: Console,
) -> ScoreRun:
    """Process every input and score each group as a case; rejected inputs are collected."""
    run = ScoreRun()
    settings = site_settings(config.runtime.settings, config.state_dir, bundle)
    audit = AuditLog(
        config.state_dir / AUDIT_FILE,
        max_bytes=config.audit.max_bytes,
        software_version=software_version(),
        source="score",
    )
    # One encoder and one segmenter session for every scan of the run, opened on first use.
    networks = SlideNetworks(bundle, settings)
    case_index = site_case_index(bundle, config.data_dir, config.outbox)
    with new_progress(console) as progress, networks:
        for case_id, paths in groups:
            slides: list[SlideResult] = []
            for path in paths:
                bars = StageBars(progress, f"{path.name[:18]}: ")
                try:
                    slides.append(
                        process_slide(
                            path,
                            networks,
                            cache_dir=config.cache_dir,
                            calibration=config.calibration,
                            progress=bars,
                        )
                    )
                except ScanError as exc:
                    run.rejected.append((path, exc.reason))
                except MemoryError:  # the readers pass it on: the machine's limit, not the file's
                    run.rejected.append((path, OUT_OF_MEMORY))
            if slides:
                bars = StageBars(progress, f"case {case_id[:18]}: ")
                scored = score_case(
                    case_id,
                    slides,
                    bundle,
                    config.outbox,
                    settings=settings,
                    progress=bars,
                    case_index=case_index,
                )
                run.cases.append(scored)
                audit_scored(audit, scored)
    return run


def audit_scored(audit: AuditLog, case: ScoredCase) -> None:
    """The ``finished`` record of a case scored outside the service."""
    result, folder = case.result, case.folder.path
    audit.record(
        "finished",
        kind="case",
        case=case.case_id,
        slides=[{"path": str(s.path), "fingerprint": s.fingerprint} for s in case.slides],
        outcome=result.status,
        status=result.status,
        version=result.version,
        result_dir=str(folder),
        result_files=result_file_hashes(folder),
        backend=result.backend,
        bundle={"name": result.bundle.name, "version": result.bundle.version,
                "sha256": result.bundle.sha256},
    )  # fmt: skip


def cell_rows(result: CaseResult) -> list[tuple[str, str]]:
    """The cell head's rows of a case: its plasma-cell burden (with the inclusion rule's
    words below the minimum) and its unsure cells, for a person to look at."""
    rows = []
    burden = result.burden
    if burden is not None:  # the interval without its own "%": it keeps to the column
        figure = (
            f"{burden.percent:.1f} % ({burden.low:.1f}-{burden.high:.1f}) "
            f"of {burden.classified} classified"
        )
        if not burden.measured:
            rows.append((burden.label, str(burden.outside)))
        else:
            rows.append((burden.label, f"{figure}; {burden.outside}" if burden.outside else figure))
    found = result.differential
    if found is not None and found.cells:  # a case whose scans all failed QC has none
        rows.append(("Unsure cells", f"{found.unsure} of {found.cells}, for a person to look at"))
    return rows


def print_table(run: ScoreRun, console: Console) -> None:
    """A row per call or finding of each case (or why it has none), its plasma-cell burden
    and unsure cells, then each case's result folder on a line of its own, whole, to
    copy: at 80 columns no task or class name is cut."""
    table = Table(
        title="cytoedge results", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0)
    )
    table.add_column("case", overflow="fold")
    table.add_column("v", justify="right")
    table.add_column("cells", justify="right")
    table.add_column("status")
    table.add_column("task")
    table.add_column("call / reason")
    for case in run.cases:
        result = case.result
        calls = [
            (p.label, f"{p.call} {p.probability:.2f}")
            for head in result.heads
            for p in head.predictions
        ]
        calls += [(f.label, f.call or f.text) for head in result.heads for f in head.findings]
        calls += cell_rows(result)
        first = (result.case_id, str(result.version), str(result.cells), result.status)
        for index, (task, call) in enumerate(calls or [("-", result.abstain_reason or "-")]):
            table.add_row(*(first if index == 0 else ("",) * len(first)), task, call)
        table.add_section()
    for path, reason in run.rejected:
        table.add_row(path.name, "-", "-", "rejected", "-", reason)
    console.print(table)
    for case in run.cases:
        console.print(f"{case.case_id} v{case.result.version}: {case.folder.path}", soft_wrap=True)
