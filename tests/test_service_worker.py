"""Watcher + worker + store in one process with a stand-in engine (no pipeline).

The engine here honours the worker's seam exactly: process_slide reads the
file (ScanError for bad bytes), score_case writes a real result folder with
appliance.results, so atomicity and versioning are the real ones.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Config, PathsConfig, ServiceConfig, WatchConfig
from appliance.readers.errors import NotAnImageError
from appliance.results import read_result, write_case_result
from appliance.review.sign_off import SignOff, sign_off
from appliance.service.audit import AuditLog, read_audit
from appliance.service.service import FollowFn, Service
from appliance.service.store import (
    DONE,
    FAILED,
    QUEUED,
    REJECTED,
    RUNNING,
    BundleIdentity,
    JobStore,
    StoreError,
)
from appliance.service.worker import (
    INTERNAL_ERROR,
    CaseOutcome,
    ProgressFn,
    SlideOutcome,
    classify,
    error_text,
)
from appliance.site.pause_note import read_pause
from cytoedge_demo.samples import sample_content

BUNDLE = BundleIdentity("test-bundle", "1.0", "a" * 64)


@dataclass
class StandInEngine:
    """Cells = bytes / 100; a file starting with b'BAD' is not an image. ``calls``
    records the expensive work only (cache misses), as the pipeline would do it."""

    slide_delay: float = 0.0
    score_errors: list[BaseException] | None = None
    calls: list[str] | None = None
    abstain: str = ""  # set: every case abstains with this reason and no predictions
    space_bytes: int = 0  # what space_needed says a slide takes

    def __post_init__(self) -> None:
        self.cache: dict[Path, SlideOutcome] = {}  # like the pipeline's embedding cache
        self.job_threads: set[int] = set()  # the threads that ran jobs
        self.closed_on: list[int] = []  # the thread of each close()

    def process_slide(
        self, path: Path, progress: ProgressFn, *, use_cache: bool, fingerprint: str | None = None
    ) -> SlideOutcome:
        self.job_threads.add(threading.get_ident())
        if use_cache and path in self.cache:
            return self.cache[path]
        data = path.read_bytes()
        if data.startswith(b"BAD"):
            raise NotAnImageError(path, "the bytes are not an image")
        steps = 10
        for i in range(steps):
            progress("segmentation", i / steps)
            time.sleep(self.slide_delay / steps)
        (self.calls if self.calls is not None else []).append(f"slide:{path.name}")
        outcome = SlideOutcome(handle={"path": str(path), "cells": len(data) // 100}, n_cells=1)
        self.cache[path] = outcome
        return outcome

    def score_case(
        self, case_key: str, slides: Sequence[object], outbox: Path, progress: ProgressFn
    ) -> CaseOutcome:
        progress("heads", 0.5)
        if self.score_errors:
            raise self.score_errors.pop(0)
        (self.calls if self.calls is not None else []).append(f"case:{case_key}")
        content = sample_content(case_key, "mm_positive", ("slide.svs",))
        if self.abstain:
            draft = replace(
                content.result, status="abstained", abstain_reason=self.abstain, heads=()
            )
            content = replace(content, result=draft)
        folder, result = write_case_result(outbox, content, write_pdf=False)
        return CaseOutcome.from_result(result, folder.path)

    def space_needed(self, path: Path) -> int:
        return self.space_bytes

    def close(self) -> None:
        self.closed_on.append(threading.get_ident())


def probe(path: Path) -> None:
    if path.is_file() and path.stat().st_size == 0:
        from appliance.readers.errors import EmptyFileError

        raise EmptyFileError(path, "the file is empty (0 bytes)")


def make_config(tmp_path: Path, **service: float) -> Config:
    for name in ("inbox", "outbox", "data"):
        (tmp_path / name).mkdir(exist_ok=True)
    return Config(
        paths=PathsConfig(
            data_dir=str(tmp_path / "data"),
            inbox=str(tmp_path / "inbox"),
            outbox=str(tmp_path / "outbox"),
        ),
        watch=WatchConfig(quiet_seconds=0.4, case_quiet_seconds=2.0, rescan_seconds=1.0),
        service=ServiceConfig(
            max_attempts=int(service.get("max_attempts", 3)),
            retry_seconds=service.get("retry_seconds", 0.3),
            stop_grace_seconds=service.get("stop_grace_seconds", 5.0),
        ),
    )


class Running:
    def __init__(
        self,
        config: Config,
        engine: StandInEngine,
        bundle: BundleIdentity = BUNDLE,
        follow: FollowFn | None = None,
        **service: Any,
    ) -> None:
        self.config = config
        self.engine = engine
        self.stop = threading.Event()
        self.service = Service(
            config,
            engine,
            probe=probe,
            bundle=bundle,
            backend="stand-in",
            follow=follow,
            **service,
        )
        self.clean: bool | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.clean = self.service.run(self.stop)

    def halt(self, timeout: float = 30.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive()

    @property
    def store(self) -> JobStore:
        return wait_for(self._open_store)  # type: ignore[return-value]

    def _open_store(self) -> JobStore | None:
        try:  # the service creates it when it starts
            return JobStore(self.service.store_path, readonly=True)
        except StoreError:
            return None


@pytest.fixture
def run_service(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(engine: StandInEngine | None = None, config: Config | None = None) -> Running:
        running = Running(config or make_config(tmp_path), engine or StandInEngine())
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.halt()


def wait_for(check: Callable[[], object], timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {check}")


def case_state(running: Running, key: str) -> str | None:
    store = running.store
    try:
        case = store.case_by_key(key)
        return case.state if case else None
    finally:
        store.close()


def versions(outbox: Path, key: str) -> list[str]:
    folder = outbox / key
    return (
        sorted(p.name for p in folder.iterdir() if p.name.startswith("v"))
        if folder.is_dir()
        else []
    )


def test_a_loose_scan_is_scored_once_with_an_audit_trail(run_service, tmp_path: Path) -> None:
    running = run_service()
    (tmp_path / "inbox" / "S1.svs").write_bytes(b"x" * 5000)
    wait_for(lambda: case_state(running, "S1") == DONE)
    assert versions(tmp_path / "outbox", "S1") == ["v1"]
    running.halt()
    assert running.clean
    service_row = running.store.service_info()
    assert service_row is not None and service_row.stopped_at is not None
    records = read_audit(tmp_path / "data" / "state" / "audit.jsonl")
    slide = next(r for r in records if r["event"] == "finished" and r["kind"] == "slide")
    for key in ("path", "size", "fingerprint", "seen_at", "started_at", "finished_at", "host"):
        assert slide[key], key
    assert slide["bundle"] == {"name": "test-bundle", "version": "1.0", "sha256": "a" * 64}
    assert slide["backend"] == "stand-in" and slide["software_version"]
    assert slide["outcome"] == DONE
    case = next(r for r in records if r["event"] == "finished" and r["kind"] == "case")
    assert (case["outcome"], case["version"]) == (DONE, 1)


def test_copies_and_renames_are_not_scored_again(run_service, tmp_path: Path) -> None:
    engine = StandInEngine(calls=[])
    running = run_service(engine)
    inbox = tmp_path / "inbox"
    (inbox / "A.svs").write_bytes(b"same" * 1000)
    wait_for(lambda: case_state(running, "A") == DONE)
    (inbox / "A-renamed.svs").write_bytes(b"same" * 1000)
    (inbox / "A.svs").unlink()
    (inbox / "A.svs").write_bytes(b"same" * 1000)  # the same scan dropped again
    wait_for(lambda: case_state(running, "A-renamed") == DONE)
    time.sleep(1.5)  # a rescan and a quiet period: nothing more may happen
    assert engine.calls == ["slide:A.svs", "case:A"]
    assert versions(tmp_path / "outbox", "A") == ["v1"]
    assert not (tmp_path / "outbox" / "A-renamed").exists()
    store = running.store
    copy = store.case_by_key("A-renamed")
    assert copy is not None and "same scan as case A" in copy.reason
    assert copy.result_version == 1


def test_a_transient_error_retries_and_leaves_nothing_half_written(
    run_service, tmp_path: Path
) -> None:
    io_error = OSError(errno.EIO, "Input/output error")
    engine = StandInEngine(score_errors=[io_error, io_error])
    running = run_service(engine)
    (tmp_path / "inbox" / "T.svs").write_bytes(b"t" * 3000)
    wait_for(lambda: case_state(running, "T") == DONE)
    store = running.store
    case = store.case_by_key("T")
    assert case is not None and case.result_version == 1
    retries = [
        r for r in read_audit(tmp_path / "data" / "state" / "audit.jsonl") if r["event"] == "retry"
    ]
    assert len(retries) == 2 and "Input/output error" in retries[0]["error"]
    assert versions(tmp_path / "outbox", "T") == ["v1"]


def test_a_full_disk_met_by_a_job_spends_no_attempt(run_service, tmp_path: Path) -> None:
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    store_full = sqlite3.OperationalError("database or disk is full")
    # More failures than max_attempts (3): each would have spent one.
    engine = StandInEngine(score_errors=[disk_full, store_full, disk_full, disk_full])
    running = run_service(engine)
    (tmp_path / "inbox" / "F.svs").write_bytes(b"f" * 3000)
    wait_for(lambda: case_state(running, "F") == DONE)
    records = read_audit(tmp_path / "data" / "state" / "audit.jsonl")
    assert "retry" not in [r["event"] for r in records]
    finished = next(r for r in records if r["event"] == "finished" and r["kind"] == "case")
    assert (finished["attempts"], finished["version"]) == (1, 1)
    assert versions(tmp_path / "outbox", "F") == ["v1"]


def test_no_job_starts_while_the_data_disk_lacks_room_and_work_resumes_with_it(
    tmp_path: Path,
) -> None:
    free = {"bytes": 5_000_000}
    config = make_config(tmp_path)
    running = Running(
        config,
        StandInEngine(space_bytes=30_000_000),
        free_space=lambda path: free["bytes"],
    )
    try:
        (tmp_path / "inbox" / "W.svs").write_bytes(b"w" * 3000)
        state_dir = tmp_path / "data" / "state"
        wait_for(lambda: "needs about 32 MB" in read_pause(state_dir).reason)
        # Nothing admitted waits in vain: the scan is queued, not started.
        store = running.store
        slide = store.slides()[0]
        assert (slide.state, slide.attempts) == (QUEUED, 0)
        assert read_pause(state_dir).reason == "data disk full: 5 MB free, needs about 32 MB"
        free["bytes"] = 40_000_000
        wait_for(lambda: case_state(running, "W") == DONE)
        assert read_pause(state_dir).reason == ""
        assert store.slides()[0].state == DONE
    finally:
        running.halt()


def test_bad_inputs_end_rejected_with_a_reason_and_service_goes_on(
    run_service, tmp_path: Path
) -> None:
    running = run_service()
    inbox = tmp_path / "inbox"
    (inbox / "empty.svs").write_bytes(b"")
    (inbox / "garbage.svs").write_bytes(b"BAD not an image")
    (inbox / "letter.docx").write_bytes(b"PK\x03\x04")
    wait_for(
        lambda: all(case_state(running, k) == REJECTED for k in ("empty", "garbage", "letter"))
    )
    (inbox / "good.svs").write_bytes(b"g" * 2000)
    wait_for(lambda: case_state(running, "good") == DONE)
    store = running.store
    reasons = {c.case_key: c.reason for c in store.cases()}
    assert "empty" in reasons["empty"]
    assert "not an image" in reasons["garbage"]
    assert "unsupported file type .docx" in reasons["letter"]


def test_a_permanent_error_fails_at_once_with_the_detail_in_the_log_only(
    run_service, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = StandInEngine(score_errors=[ValueError("heads disagree on shape")])
    with caplog.at_level(logging.ERROR, logger="appliance.service.worker"):
        running = run_service(engine)
        (tmp_path / "inbox" / "P.svs").write_bytes(b"p" * 1000)
        wait_for(lambda: case_state(running, "P") == FAILED)
    case = running.store.case_by_key("P")
    assert case is not None and case.attempts == 1
    assert case.reason == INTERNAL_ERROR.format(job="case")
    failed = [r for r in caplog.records if r.getMessage() == "case failed"]
    assert failed and failed[0].exc_info is not None
    assert "heads disagree on shape" in str(failed[0].exc_info[1])


def test_stored_error_text_is_a_sentence_never_internal_text() -> None:
    assert error_text(NotAnImageError(Path("x.svs"), "not an image: no scan format")) == (
        "not an image: no scan format"
    )
    assert error_text(KeyError("tile 7")) == INTERNAL_ERROR.format(job="scan")
    assert error_text(AttributeError("'int' object has no attribute 'name'"), "case") == (
        INTERNAL_ERROR.format(job="case")
    )
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    assert error_text(disk_full) == "temporary system problem: No space left on device"
    wrapped = RuntimeError("writing the report failed")
    wrapped.__cause__ = disk_full
    assert classify(wrapped) == "transient" and "No space left" in error_text(wrapped)
    gpu = RuntimeError("CUDA failure 2: out of memory ; GPU=0 ; file=cuda_allocator.cc")
    assert classify(gpu) == "transient"
    assert error_text(gpu) == "temporary system problem: out of memory"
    assert classify(KeyError("tile 7")) == "permanent"


def test_case_folder_waits_for_ready_and_a_late_slide_bumps_the_version(
    run_service, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    config = replace(config, watch=replace(config.watch, case_quiet_seconds=60.0))
    engine = StandInEngine(calls=[])
    running = run_service(engine, config)
    case = tmp_path / "inbox" / "P-7"
    case.mkdir()
    (case / "a.svs").write_bytes(b"a" * 1000)
    (case / "b.svs").write_bytes(b"b" * 1000)
    store = running.store
    wait_for(lambda: len([s for s in store.slides() if s.state == DONE]) == 2)
    time.sleep(1.0)
    assert case_state(running, "P-7") == "waiting", "no .ready yet, quiet period not over"
    (case / ".ready").write_bytes(b"")
    wait_for(lambda: case_state(running, "P-7") == DONE)
    assert versions(tmp_path / "outbox", "P-7") == ["v1"]
    (case / "c.svs").write_bytes(b"c" * 1000)
    wait_for(lambda: versions(tmp_path / "outbox", "P-7") == ["v1", "v2"])
    wait_for(lambda: case_state(running, "P-7") == DONE)
    assert engine.calls.count("slide:a.svs") == 1, "a late slide costs only the heads"
    latest = json.loads((tmp_path / "outbox" / "P-7" / "latest.json").read_text())
    assert latest["version"] == 2


def test_stop_abandons_a_long_job_cleanly_within_the_grace_period(
    run_service, tmp_path: Path
) -> None:
    config = make_config(tmp_path, stop_grace_seconds=0.5)
    running = run_service(StandInEngine(slide_delay=60.0), config)
    (tmp_path / "inbox" / "L.svs").write_bytes(b"l" * 1000)
    store = running.store
    wait_for(
        lambda: (s := store.slide_by_path(str(tmp_path / "inbox" / "L.svs"))) and s.state == RUNNING
    )
    started = time.monotonic()
    running.halt()
    assert time.monotonic() - started < 10
    assert running.clean
    slide = store.slide_by_path(str(tmp_path / "inbox" / "L.svs"))
    assert slide is not None and (slide.state, slide.attempts) == (QUEUED, 0)
    engine = running.engine
    # Closed once, on the thread that ran the job (where its sessions were made).
    assert len(engine.job_threads) == 1 and engine.closed_on == list(engine.job_threads)


def test_a_result_written_before_a_crash_is_adopted_not_written_again(
    run_service, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    config.ensure_dirs()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.state_dir / "jobs.sqlite")
    scan = tmp_path / "inbox" / "C.svs"
    scan.write_bytes(b"c" * 1000)
    row = store.add_waiting_slide("C", str(scan), 1000, scan.stat().st_mtime, single=True, now=1.0)
    store.admit_slide(
        row.id, fingerprint="fc", bundle_hash=BUNDLE.sha256, size=1000,
        mtime=scan.stat().st_mtime, now=1.0,
    )  # fmt: skip
    store.start_slide(row.id, 2.0)
    store.finish_slide(row.id, DONE, n_cells=10, now=3.0)
    case = store.case_by_key("C")
    assert case is not None
    store.start_case(case.id, 1, 4.0)
    # The crashed run had renamed v1 into place but not yet recorded it.
    write_case_result(
        config.outbox, sample_content("C", "mm_positive", ("c.svs",)), write_pdf=False
    )
    (config.outbox / "C" / ".staging-leftover").mkdir()
    store.close()
    engine = StandInEngine(calls=[])
    running = run_service(engine, config)
    wait_for(lambda: case_state(running, "C") == DONE)
    assert versions(config.outbox, "C") == ["v1"]
    assert engine.calls == []
    assert not (config.outbox / "C" / ".staging-leftover").exists()


def test_a_sign_off_that_took_the_crashed_job_s_number_is_not_adopted(
    run_service, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    config.ensure_dirs()
    store = JobStore(config.state_dir / "jobs.sqlite")
    scan = tmp_path / "inbox" / "R.svs"
    scan.write_bytes(b"r" * 1000)
    row = store.add_waiting_slide("R", str(scan), 1000, scan.stat().st_mtime, single=True, now=1.0)
    store.admit_slide(
        row.id, fingerprint="fr", bundle_hash=BUNDLE.sha256, size=1000,
        mtime=scan.stat().st_mtime, now=1.0,
    )  # fmt: skip
    store.start_slide(row.id, 2.0)
    store.finish_slide(row.id, DONE, n_cells=10, now=3.0)
    case = store.case_by_key("R")
    assert case is not None
    first, _ = write_case_result(
        config.outbox, sample_content("R", "mm_positive", ("r.svs",)), write_pdf=False
    )
    # A re-score started as version 2 and died; meanwhile version 1 was signed off as v2.
    store.start_case(case.id, 2, 4.0)
    store.close()
    sign_off(
        first.path, SignOff("accepted", "Dr R"), data_dir=tmp_path,
        audit=AuditLog(tmp_path / "audit.jsonl"), write_pdf=False,
    )  # fmt: skip
    engine = StandInEngine(calls=[])
    running = run_service(engine, config)
    wait_for(lambda: case_state(running, "R") == DONE)
    assert engine.calls[-1] == "case:R"  # scored again, as asked
    assert versions(config.outbox, "R") == ["v1", "v2", "v3"]
    assert read_result(config.outbox / "R" / "v3").review is None


def test_paused_watching_takes_no_new_scan_until_resumed(run_service, tmp_path: Path) -> None:
    running = run_service()
    running.service.watching_paused.set()
    store = running.store
    (tmp_path / "inbox" / "W.svs").write_bytes(b"w" * 1000)
    time.sleep(2.0)
    assert store.slides() == []
    running.service.watching_paused.clear()
    wait_for(lambda: case_state(running, "W") == DONE)


def test_an_archive_move_takes_finished_inputs_out_of_the_inbox(
    run_service, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    config = make_config(tmp_path)
    config = replace(config, paths=replace(config.paths, archive=str(archive)))
    running = run_service(StandInEngine(), config)
    inbox = tmp_path / "inbox"
    case = inbox / "P-9"
    case.mkdir()
    (case / "a.svs").write_bytes(b"a" * 1000)
    (case / ".ready").write_bytes(b"")
    (inbox / "loose.png").write_bytes(b"l" * 1000)
    (inbox / "loose.png.json").write_bytes(b'{"pixel_size_um": 0.25}')
    wait_for(lambda: case_state(running, "P-9") == DONE and case_state(running, "loose") == DONE)
    wait_for(lambda: not case.exists() and not (inbox / "loose.png").exists())
    assert (archive / "P-9" / "a.svs").read_bytes() == b"a" * 1000
    assert (archive / "P-9" / ".ready").exists()
    assert (archive / "loose.png.json").exists(), "the sidecar moves with its scan"
    store = running.store
    paths = {Path(s.path).name: s.path for s in store.slides()}
    assert paths["a.svs"] == str((archive / "P-9" / "a.svs").resolve())
    # A late slide for the archived case is scored with the archived one.
    case.mkdir()
    (case / "b.svs").write_bytes(b"b" * 1000)
    (case / ".ready").write_bytes(b"")
    wait_for(lambda: versions(tmp_path / "outbox", "P-9") == ["v1", "v2"])
    wait_for(lambda: (archive / "P-9" / "b.svs").exists())


def test_rescore_processes_the_scan_again_and_adds_a_version(run_service, tmp_path: Path) -> None:
    from rich.console import Console

    from appliance.cli.service_commands import request_rescore

    engine = StandInEngine(calls=[])
    running = run_service(engine)
    scan = tmp_path / "inbox" / "R.svs"
    scan.write_bytes(b"r" * 1000)
    wait_for(lambda: case_state(running, "R") == DONE)
    console = Console(quiet=True)
    assert request_rescore(running.config, [str(scan)], console) == 0
    wait_for(lambda: versions(tmp_path / "outbox", "R") == ["v1", "v2"])
    assert engine.calls.count("slide:R.svs") == 2, "the cache is bypassed on a re-score"
    assert request_rescore(running.config, ["R"], console) == 0  # by case id
    wait_for(lambda: versions(tmp_path / "outbox", "R") == ["v1", "v2", "v3"])
    assert request_rescore(running.config, ["no-such-case"], console) == 1


def test_a_case_with_no_call_possible_is_rejected_and_its_result_says_why(
    run_service, tmp_path: Path
) -> None:
    running = run_service(StandInEngine(abstain="too few cells: 3 (the bundle needs at least 50)"))
    (tmp_path / "inbox" / "F.svs").write_bytes(b"f" * 1000)
    wait_for(lambda: case_state(running, "F") == REJECTED)
    case = running.store.case_by_key("F")
    assert case is not None and case.reason.startswith("too few cells")
    assert case.result_version == 1
    result = json.loads((tmp_path / "outbox" / "F" / "v1" / "result.json").read_text())
    assert result["abstain_reason"] == case.reason


def test_polling_observer_mode_serves_too(run_service, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config = replace(config, watch=replace(config.watch, polling=True))
    running = run_service(StandInEngine(), config)
    (tmp_path / "inbox" / "N.svs").write_bytes(b"n" * 1000)
    wait_for(lambda: case_state(running, "N") == DONE)


def test_systemd_hears_ready_watchdog_pings_and_stopping(
    run_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # pings every 0.2 s
    running = run_service()
    heard: list[str] = []
    while heard.count("WATCHDOG=1") < 2:
        heard.append(sock.recv(4096).decode())
    assert heard[0] == "READY=1"
    running.halt()
    rest = []
    with contextlib.suppress(TimeoutError):
        sock.settimeout(1)
        while True:
            rest.append(sock.recv(4096).decode())
    assert "STOPPING=1" in rest
    sock.close()
