"""Job store transitions, without the pipeline."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.service.store import (
    DONE,
    FAILED,
    QUEUED,
    REJECTED,
    RUNNING,
    WAITING,
    JobStore,
    StoreError,
)

BUNDLE = "b" * 64


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "state" / "jobs.sqlite")


def admitted(store: JobStore, case: str, path: str, fp: str, now: float, single: bool = True):
    row = store.add_waiting_slide(case, path, 10, 1.0, single=single, now=now)
    return store.admit_slide(
        row.id, fingerprint=fp, bundle_hash=BUNDLE, size=10, mtime=1.0, now=now
    )


def case_job_started(store: JobStore, path: str, *, single: bool):
    """Case P: its one slide (fingerprint f1) processed at 102, its case job started at 103."""
    slide = admitted(store, "P", path, "f1", 100.0, single=single)
    store.start_slide(slide.id, 101.0)
    store.finish_slide(slide.id, DONE, n_cells=10, now=102.0)
    case = store.case_by_key("P")
    store.start_case(case.id, 1, 103.0)
    return slide, case


def test_store_is_wal_and_readable_read_only_while_open(store: JobStore, tmp_path: Path) -> None:
    admitted(store, "A", "/in/A.svs", "f1", 100.0)
    mode = store._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reader = JobStore(store.path, readonly=True)
    assert [c.case_key for c in reader.cases()] == ["A"]
    with pytest.raises(StoreError, match="read-only"):
        reader.set_case_ready(1, True, 0.0)
    with pytest.raises(sqlite3.OperationalError):
        reader._conn.execute("UPDATE cases SET state = 'done'")


def test_read_only_open_of_a_missing_store_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no job store"):
        JobStore(tmp_path / "nothing.sqlite", readonly=True)


def test_waiting_then_queued_then_done(store: JobStore) -> None:
    row = store.add_waiting_slide("A", "/in/A.svs", 5, 1.0, single=True, now=100.0)
    assert row.state == WAITING and row.fingerprint is None
    slide = store.admit_slide(
        row.id, fingerprint="f1", bundle_hash=BUNDLE, size=10, mtime=2.0, now=101.0
    )
    assert (slide.state, slide.size, slide.fingerprint) == (QUEUED, 10, "f1")
    assert store.next_slide_job(102.0) == slide
    running = store.start_slide(slide.id, 103.0)
    assert (running.state, running.attempts) == (RUNNING, 1)
    store.slide_progress(slide.id, "segmentation", 0.4)
    assert store.slide(slide.id).stage == "segmentation"
    store.finish_slide(slide.id, DONE, n_cells=321, now=104.0)
    done = store.slide(slide.id)
    assert (done.state, done.n_cells, done.progress) == (DONE, 321, 1.0)
    assert store.next_slide_job(105.0) is None


def test_same_content_twice_is_a_duplicate_not_a_second_job(store: JobStore) -> None:
    first = admitted(store, "A", "/in/A.svs", "same", 100.0)
    copy = admitted(store, "A-copy", "/in/A-copy.svs", "same", 101.0)
    assert first.state == QUEUED
    assert copy.state == DONE and copy.duplicate_of == first.id
    assert "same scan as /in/A.svs" in copy.reason
    other_bundle = store.add_waiting_slide("A2", "/in/A2.svs", 10, 1.0, single=True, now=102.0)
    again = store.admit_slide(
        other_bundle.id, fingerprint="same", bundle_hash="c" * 64, size=10, mtime=1.0, now=103.0
    )
    assert again.state == QUEUED, "another bundle scores the same content again"
    assert store.next_slide_job(200.0).id == first.id


def test_recovery_requeues_running_rows_and_fails_a_job_that_keeps_crashing(
    store: JobStore,
) -> None:
    a = admitted(store, "A", "/in/A.svs", "fa", 100.0)
    b = admitted(store, "B", "/in/B.svs", "fb", 100.0)
    store.start_slide(a.id, 101.0)
    for _ in range(3):
        store.start_slide(b.id, 101.0)
    touched = store.recover(max_attempts=3, now=102.0)
    assert ("slide", a.id, QUEUED) in touched and ("slide", b.id, FAILED) in touched
    assert store.slide(a.id).state == QUEUED
    failed = store.slide(b.id)
    assert failed.state == FAILED and "stopped while processing it 3 times" in failed.reason


def test_retry_waits_for_its_time_and_abandon_does_not_count(store: JobStore) -> None:
    a = admitted(store, "A", "/in/A.svs", "fa", 100.0)
    store.start_slide(a.id, 101.0)
    store.retry_slide(a.id, "No space left on device", at=150.0)
    assert store.next_slide_job(149.0) is None
    assert store.next_slide_job(150.0).last_error == "No space left on device"
    store.start_slide(a.id, 151.0)
    store.abandon_slide(a.id)
    again = store.slide(a.id)
    assert (again.state, again.attempts) == (QUEUED, 1)


def test_a_case_is_ready_on_its_ready_file_or_after_the_quiet_period(store: JobStore) -> None:
    s1 = admitted(store, "P1", "/in/P1/a.svs", "f1", 100.0, single=False)
    s2 = admitted(store, "P1", "/in/P1/b.svs", "f2", 110.0, single=False)
    case = store.case_by_key("P1")
    assert case is not None and case.state == WAITING
    assert store.promote_ready_cases(300.0, now=500.0) == [], "slides still queued"
    for s in (s1, s2):
        store.start_slide(s.id, 120.0)
        store.finish_slide(s.id, DONE, n_cells=100, now=121.0)
    assert store.promote_ready_cases(300.0, now=400.0) == [], "quiet period not over"
    assert [c.case_key for c in store.promote_ready_cases(300.0, now=410.0)] == ["P1"]

    s3 = admitted(store, "P2", "/in/P2/a.svs", "f3", 100.0, single=False)
    store.start_slide(s3.id, 101.0)
    store.finish_slide(s3.id, DONE, n_cells=5, now=102.0)
    assert store.promote_ready_cases(300.0, now=103.0) == []
    store.set_case_ready(s3.case_id, True, 103.0)
    assert [c.case_key for c in store.promote_ready_cases(300.0, now=104.0)] == ["P2"]


def test_a_loose_file_is_a_case_of_one_scored_once_its_slide_is_done(store: JobStore) -> None:
    s = admitted(store, "X", "/in/X.svs", "fx", 100.0, single=True)
    store.start_slide(s.id, 101.0)
    store.finish_slide(s.id, REJECTED, reason="QC failed", n_cells=3, now=102.0)
    assert [c.case_key for c in store.promote_ready_cases(300.0, now=102.5)] == ["X"]


def test_a_late_slide_reopens_a_scored_case_and_keeps_its_version(store: JobStore) -> None:
    _, case = case_job_started(store, "/in/P/a.svs", single=False)
    store.finish_case(case.id, DONE, reason="", result_version=1, result_dir="/o/P/v1", now=104.0)
    assert store.case(case.id).state == DONE
    admitted(store, "P", "/in/P/b.svs", "f2", 200.0, single=False)
    reopened = store.case(case.id)
    assert (reopened.state, reopened.result_version, reopened.last_slide_at) == (WAITING, 1, 200.0)


def test_a_slide_arriving_while_the_case_is_scored_rescores_it_afterwards(
    store: JobStore,
) -> None:
    _, case = case_job_started(store, "/in/P/a.svs", single=False)
    late = store.add_waiting_slide("P", "/in/P/late.svs", 1, 1.0, single=False, now=103.5)
    store.admit_slide(late.id, fingerprint="f2", bundle_hash=BUNDLE, size=1, mtime=1.0, now=103.6)
    assert store.case(case.id).state == RUNNING
    store.finish_case(case.id, DONE, reason="", result_version=1, result_dir="/o/P/v1", now=104.0)
    after = store.case(case.id)
    assert (after.state, after.result_version) == (WAITING, 1)


def test_new_content_under_a_known_name_while_the_case_is_scored_rescores_it_afterwards(
    store: JobStore,
) -> None:
    s1, case = case_job_started(store, "/in/P/a.svs", single=False)
    store.admit_slide(s1.id, fingerprint="f1b", bundle_hash=BUNDLE, size=11, mtime=2.0, now=103.5)
    store.finish_case(case.id, DONE, reason="", result_version=1, result_dir="/o/P/v1", now=104.0)
    assert store.case(case.id).state == WAITING


def test_a_unit_seen_only_in_passing_leaves_a_scored_case_alone(store: JobStore) -> None:
    """A folder being deleted or written can look, for one look, like a case folder
    of loose images: those rows come and go without the case being scored again."""
    _, case = case_job_started(store, "/in/P", single=True)
    passing = store.add_waiting_slide("P", "/in/P/cell_1.tif", 1, 1.0, single=False, now=103.5)
    store.finish_case(case.id, DONE, reason="", result_version=1, result_dir="/o/P/v1", now=104.0)
    again = store.add_waiting_slide("P", "/in/P/cell_2.tif", 1, 1.0, single=False, now=104.5)
    assert store.case(case.id).state == DONE
    store.forget_slide(passing.id)
    store.forget_slide(again.id)
    assert store.case(case.id).state == DONE
    assert store.promote_ready_cases(0.0, now=500.0) == []


def test_rescore_requeues_the_slide_with_caches_bypassed_and_reopens_its_case(
    store: JobStore,
) -> None:
    s = admitted(store, "A", "/in/A.svs", "fa", 100.0)
    copy = admitted(store, "A2", "/in/A2.svs", "fa", 100.0)
    store.start_slide(s.id, 101.0)
    store.finish_slide(s.id, DONE, n_cells=10, now=102.0)
    store.start_case(s.case_id, 1, 103.0)
    store.finish_case(s.case_id, DONE, reason="", result_version=1, result_dir="/o", now=104.0)
    target = store.request_rescore_slide(copy.id, 200.0)
    assert target.id == s.id, "a copy re-scores the scan it is a copy of"
    assert (target.state, target.rescore, target.attempts) == (QUEUED, 1, 0)
    assert store.case(s.case_id).state == WAITING
    store.start_slide(s.id, 201.0)
    store.finish_slide(s.id, DONE, n_cells=10, now=202.0)
    assert store.slide(s.id).rescore == 0


def test_a_vanished_waiting_scan_is_forgotten_with_its_empty_case(store: JobStore) -> None:
    row = store.add_waiting_slide("A", "/in/A.svs", 5, 1.0, single=True, now=100.0)
    kept = store.add_waiting_slide("B", "/in/B/1.svs", 5, 1.0, single=False, now=100.0)
    store.add_waiting_slide("B", "/in/B/2.svs", 5, 1.0, single=False, now=100.0)
    store.forget_slide(row.id)
    store.forget_slide(kept.id)
    assert store.slide_by_path("/in/A.svs") is None
    assert store.case_by_key("A") is None
    assert store.case_by_key("B") is not None, "B still has a slide"


FULL_DISK_SCRIPT = """
import os, sys, time
from pathlib import Path
from appliance.service.pause import is_disk_full
from appliance.service.store import JobStore
disk = Path(sys.argv[1])
store = JobStore(disk / "jobs.sqlite")
store.ensure_case("before", single=True, now=time.time())
with open(disk / "ballast", "wb") as ballast:
    try:
        while True:
            ballast.write(b"x" * 65536)
            ballast.flush()
    except OSError:
        pass
try:
    for i in range(100_000):  # until the WAL needs a page the disk has not got
        store.ensure_case(f"full-{i}", single=True, now=time.time())
except Exception as exc:
    print("full:", is_disk_full(exc), store._conn.in_transaction)
(disk / "ballast").unlink()
store.ensure_case("after", single=True, now=time.time())
print("after:", store.case_by_key("after") is not None)
"""


def test_a_write_that_meets_a_full_disk_is_rolled_back_and_the_store_works_again(
    tmp_path: Path,
) -> None:
    """On a real 1 MB tmpfs (a user and mount namespace: no root needed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f'mount -t tmpfs -o size=1m tmpfs "{disk}" && exec "$@"'
    script = (sys.executable, "-c", FULL_DISK_SCRIPT, str(disk))
    try:
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", mount, "sh", *script],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[1],
        )
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if "mount" in done.stderr or "unshare" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["full: True False", "after: True"]
