"""What ``cytoedge run``, ``cytoedge status`` and ``cytoedge rescore`` do."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from appliance.config import Config
from appliance.service.startup import ServiceSetupError, build_service, stop_on_signals
from appliance.service.store import RUNNING, JobStore, Slide, StoreError, store_path
from appliance.site.pause_note import read_pause

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_UNUSABLE = 0, 1, 2
# The service counts as running when its heartbeat is younger than this.
ALIVE_SECONDS = 30.0


def _fail(message: str) -> int:
    sys.stderr.write(f"cytoedge: {message}\n")
    return EXIT_UNUSABLE


def run_service(config: Config) -> int:
    """Serve until SIGTERM / SIGINT / SIGHUP; the exit code for the service manager."""
    try:
        service = build_service(config)
    except ServiceSetupError as exc:
        return _fail(str(exc))
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        clean = service.run(stop)
    except StoreError as exc:
        return _fail(str(exc))
    if clean:
        return EXIT_OK  # the worker has ended: a normal interpreter exit is safe
    # The worker is still inside one call after the grace and abandon periods
    # (a native call that does not return). Its job is recovered as interrupted
    # on the next start; tearing the interpreter down under a thread that is
    # running native code could crash or hang, so leave at once.
    log.error("leaving with the current job unfinished; it is recovered on the next start")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_ERROR)


def print_status(config: Config, limit: int, console: Console) -> int:
    """The queue, most recent cases first, with their slides."""
    try:
        store = JobStore(store_path(config.state_dir), readonly=True, timeout=1.0)
    except StoreError as exc:
        return _fail(str(exc))
    try:
        service = store.service_info()
        cases = store.cases()[::-1][:limit]
        slides = {c.id: store.slides(c.id) for c in cases}
        counts = store.counts()
    finally:
        store.close()
    pause = read_pause(config.state_dir)
    if service is None:
        console.print("service: has not run yet")
    else:
        # On a full disk the store's heartbeat cannot be written; the pause note's can.
        age = time.time() - max(service.heartbeat_at, pause.at)
        if service.stopped_at:
            alive = f"stopped {time.time() - service.stopped_at:.0f} s ago"
        elif age < ALIVE_SECONDS:
            alive = "running"
        else:
            alive = f"not running (last seen {age:.0f} s ago; it did not stop cleanly)"
        console.print(
            f"service: {alive}; pid {service.pid} on {service.host}; "
            f"bundle {service.bundle}; backend {service.backend}; "
            f"cytoedge {service.software_version}"
        )
        if pause.reason and not service.stopped_at:
            console.print(pause.reason, style="bold yellow", markup=False)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts["cases"].items()))
    console.print(f"cases: {summary or 'none'}")
    table = Table(show_lines=False)
    for column in ("case / slide", "state", "stage", "version", "attempts", "reason / result"):
        table.add_column(column, overflow="fold")
    for case in cases:
        stage = f"{case.stage} {case.progress:.0%}" if case.state == RUNNING else ""
        detail = case.reason or case.result_dir
        version = str(case.result_version) if case.result_version else ""
        table.add_row(case.case_key, case.state, stage, version, str(case.attempts), detail)
        for slide in slides[case.id]:
            stage = f"{slide.stage} {slide.progress:.0%}" if slide.state == RUNNING else ""
            cells = f"{slide.n_cells} cells" if slide.n_cells is not None else ""
            table.add_row(
                f"  {Path(slide.path).name}",
                slide.state,
                stage,
                "",
                str(slide.attempts),
                slide.reason or slide.last_error or cells,
            )
    console.print(table)
    return EXIT_OK


def request_rescore(config: Config, targets: list[str], console: Console) -> int:
    """Flag slides (by path) or cases (by folder or case id) to be scored again."""
    path = store_path(config.state_dir)
    if not path.is_file():
        return _fail(f"no job store at {path} (has the service run yet?)")
    store = JobStore(path)
    status = EXIT_OK
    try:
        now = time.time()
        for target in targets:
            slide = _find_slide(store, target)
            if slide is not None:
                flagged = store.request_rescore_slide(slide.id, now)
                console.print(f"{target}: slide {flagged.path} will be processed and scored again")
                continue
            case = store.case_by_key(Path(target).name) or store.case_by_key(target)
            if case is not None:
                store.request_rescore_case(case.id, now)
                console.print(f"{target}: case {case.case_key} will be scored again")
                continue
            sys.stderr.write(f"cytoedge: {target}: no such slide or case in the job store\n")
            status = EXIT_ERROR
    finally:
        store.close()
    return status


def _find_slide(store: JobStore, target: str) -> Slide | None:
    for candidate in {target, str(Path(target).absolute()), str(Path(target).resolve())}:
        slide = store.slide_by_path(candidate)
        if slide is not None:
            return slide
    return None
