"""``cytoedge run`` as a real process on real files: slow writers, kill -9, copies,
bad files and a full disk. Each test is bounded by short quiet periods."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.service.audit import read_audit
from appliance.service.store import DONE, QUEUED, REJECTED, RUNNING, WAITING
from appliance.site.pause_note import read_pause
from cytoedge_demo.synthetic import write_cell_folders
from tests.runtime_models import TinyBundle
from tests.service_harness import (
    ServiceProcess,
    copy_unit,
    result_versions,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TinyBundle(tmp_path_factory.mktemp("tiny")).write().path


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-cell folders (a scan unit the pipeline reads), distinct content each."""
    root = tmp_path_factory.mktemp("patients")
    write_cell_folders(root, 4, 60, seed=11)
    big = root / "big"
    write_cell_folders(big, 1, 400, seed=12)
    return root


@pytest.fixture
def service(tmp_path: Path, bundle_dir: Path) -> Iterator[ServiceProcess]:
    config = write_config(tmp_path, bundle_dir)
    running = ServiceProcess(config, tmp_path / "data" / "state")
    yield running
    running.ensure_stopped()


def test_a_scan_written_slowly_is_taken_only_once_complete_then_scored_once(
    service: ServiceProcess, patients: Path, tmp_path: Path
) -> None:
    service.start()
    source = patients / "P0001"
    target = tmp_path / "inbox" / "P0001"
    target.mkdir()
    files = sorted(p for p in source.iterdir() if p.suffix == ".tif")
    started = time.monotonic()
    for i, path in enumerate(files):  # ~12 s: each image in two halves
        data = path.read_bytes()
        with open(target / path.name, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(0.2)
            out.write(data[len(data) // 2 :])
        if i % 10 == 0:
            states = service.read(lambda s: [x.state for x in s.slides()]) or []
            assert set(states) <= {WAITING}, f"taken before complete: {states}"
    assert time.monotonic() - started > 10
    assert result_versions(tmp_path / "outbox", "P0001") == []
    completed_at = time.time()
    (target / ".ready").write_bytes(b"")
    service.wait_for(lambda: service.case_state("P0001") == DONE, 60, "the case scored")
    slide = service.read(lambda s: s.slides()[0])
    assert slide.started_at >= completed_at - 0.01, "processing began before the scan was complete"
    assert slide.attempts == 1 and slide.n_cells == 60
    time.sleep(2.5)  # a rescan later: still exactly one result
    assert result_versions(tmp_path / "outbox", "P0001") == ["v1"]
    assert service.terminate() == 0


def test_kill_9_during_a_job_then_restart_completes_it_with_one_result(
    service: ServiceProcess, patients: Path, tmp_path: Path
) -> None:
    service.start()
    copy_unit(patients / "big" / "P0001", tmp_path / "inbox" / "BIG")
    service.wait_for(
        lambda: service.read(lambda s: any(x.state == RUNNING for x in s.slides())),
        60,
        "the job running",
    )
    service.kill()
    assert service.read(lambda s: s.slides()[0].state) == RUNNING  # left behind by the crash
    service.start()
    service.wait_for(lambda: service.case_state("BIG") == DONE, 90, "the job finished")
    slide = service.read(lambda s: s.slides()[0])
    assert slide.attempts == 2 and slide.n_cells == 400
    case_dir = tmp_path / "outbox" / "BIG"
    assert result_versions(tmp_path / "outbox", "BIG") == ["v1"]
    leftovers = [p.name for p in case_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    latest = json.loads((case_dir / "latest.json").read_text())
    assert latest == {"version": 1, "path": "v1"}
    events = [r["event"] for r in read_audit(tmp_path / "data" / "state" / "audit.jsonl")]
    assert "recovered" in events
    assert service.terminate() == 0


def test_the_same_scan_twice_and_a_renamed_copy_are_scored_once(
    service: ServiceProcess, patients: Path, tmp_path: Path
) -> None:
    service.start()
    inbox = tmp_path / "inbox"
    copy_unit(patients / "P0002", inbox / "P0002")
    service.wait_for(lambda: service.case_state("P0002") == DONE, 60, "the first scoring")
    shutil.rmtree(inbox / "P0002")
    copy_unit(patients / "P0002", inbox / "P0002")  # dropped again
    copy_unit(patients / "P0002", inbox / "renamed")  # a renamed copy
    service.wait_for(lambda: service.case_state("renamed") == DONE, 60, "the copy recognised")
    time.sleep(3.0)  # quiet period + rescan: nothing else may be scored
    assert result_versions(tmp_path / "outbox", "P0002") == ["v1"]
    assert not (tmp_path / "outbox" / "renamed").exists()
    copy = service.case("renamed")
    assert "same scan as case P0002" in copy.reason
    scored = [
        r
        for r in read_audit(tmp_path / "data" / "state" / "audit.jsonl")
        if r["event"] == "finished" and r["kind"] == "slide" and r["outcome"] == DONE
    ]
    assert len(scored) == 1
    assert service.terminate() == 0


def test_bad_files_are_rejected_with_a_reason_and_the_next_good_scan_is_served(
    service: ServiceProcess, patients: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "empty.svs").write_bytes(b"")
    good_tif = next((patients / "P0003").glob("*.tif")).read_bytes()
    (inbox / "truncated.tif").write_bytes(good_tif[: len(good_tif) // 3])
    (inbox / "text.svs").write_text("this is not a slide\n" * 50)
    (inbox / "report.docx").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    service.start()
    bad = ("empty", "truncated", "text", "report")
    service.wait_for(
        lambda: all(service.case_state(k) in (REJECTED, "failed") for k in bad),
        60,
        "every bad file finished",
    )
    copy_unit(patients / "P0003", inbox / "P0003")
    service.wait_for(lambda: service.case_state("P0003") == DONE, 60, "the good scan scored")
    reasons = {k: service.case(k).reason for k in bad}
    assert "empty" in reasons["empty"]
    assert "not an image" in reasons["text"]
    assert "unsupported file type .docx" in reasons["report"]
    assert reasons["truncated"], "a truncated file says why"
    for key in bad:
        assert result_versions(tmp_path / "outbox", key) == []
    status = subprocess.run(
        [os.sys.executable, "-m", "appliance", "status"],
        env={**os.environ, "CYTOEDGE_CONFIG": str(service.config)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and "report.docx" in status.stdout and "running" in status.stdout
    assert service.terminate() == 0


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_output_disk_holds_the_case_and_it_succeeds_when_space_returns(
    tmp_path: Path, bundle_dir: Path, patients: Path
) -> None:
    outbox = tmp_path / "small-disk"
    if not _mount_tmpfs(outbox, "8m"):
        pytest.skip("needs permission to mount a small tmpfs as the output disk")
    service = None
    try:
        filler = outbox / "filler"
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
            except OSError:
                pass
        config = write_config(tmp_path, bundle_dir, outbox=outbox)
        service = ServiceProcess(config, tmp_path / "data" / "state").start()
        copy_unit(patients / "P0004", tmp_path / "inbox" / "P0004")
        state_dir = tmp_path / "data" / "state"
        service.wait_for(
            lambda: read_pause(state_dir).reason.startswith("outbox disk full"),
            60,
            "the case held",
        )
        case = service.case("P0004")
        assert case is not None and (case.state, case.attempts) == (QUEUED, 0)
        assert result_versions(outbox, "P0004") == []
        leftovers = [p.name for p in (outbox / "P0004").glob(".*")]
        assert leftovers == [], f"half-written result left: {leftovers}"
        filler.unlink()
        service.wait_for(lambda: service.case_state("P0004") == DONE, 60, "success once freed")
        assert result_versions(outbox, "P0004") == ["v1"]
        assert (outbox / "P0004" / "v1" / "result.json").is_file()
        assert service.terminate() == 0
    finally:
        if service is not None:
            service.ensure_stopped()
        subprocess.run(["umount", "-l", str(outbox)], capture_output=True, timeout=10)
