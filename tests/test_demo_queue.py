"""``cytoedge demo`` scores outside the service; its cases are recorded in the job store
(``JobStore.record_finished_case``), so the window lists them the first time it opens
(tests/test_demo_run.py opens it on a real demo run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.service.store import (
    DONE,
    REJECTED,
    RUNNING,
    BundleIdentity,
    FinishedSlide,
    JobStore,
    StoreError,
)

BUNDLE = BundleIdentity("cytoedge-demo", "1", "d" * 64)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "state" / "jobs.sqlite")


def record(store: JobStore, case: str, slides: list[FinishedSlide], version: int, now: float):
    return store.record_finished_case(
        case, slides, state=DONE, reason="", result_version=version,
        result_dir=f"/out/{case}/v{version}", bundle_hash=BUNDLE.sha256, now=now,
        written_by=BUNDLE, backend="ort-cpu",
    )  # fmt: skip


def test_a_case_scored_outside_is_recorded_as_the_worker_leaves_one(store: JobStore) -> None:
    slides = [
        FinishedSlide("/demo/p/a.tif", DONE, fingerprint="fa", n_cells=80, size=10),
        FinishedSlide("/demo/p/b.tif", REJECTED, fingerprint="fb", reason="slide QC failed: x"),
        FinishedSlide("/demo/p/c.tif", REJECTED, reason="not an image: c.tif"),
    ]
    case = record(store, "P", slides, 1, 100.0)
    assert (case.state, case.result_version, case.result_dir) == (DONE, 1, "/out/P/v1")
    rows = store.slides(case.id)
    assert [(s.path, s.state, s.n_cells, s.fingerprint) for s in rows] == [
        ("/demo/p/a.tif", DONE, 80, "fa"),
        ("/demo/p/b.tif", REJECTED, None, "fb"),
        ("/demo/p/c.tif", REJECTED, None, None),
    ]
    assert [r.version for r in store.results(case.id)] == [1]
    # Scored again (the demo run twice): the same rows, the new version.
    again = record(store, "P", slides[:1], 2, 200.0)
    assert again.id == case.id and again.result_version == 2
    assert len(store.slides(case.id)) == 3
    assert [r.version for r in store.results(case.id)] == [1, 2]
    # The service's re-score takes it up like any case of its own.
    store.request_rescore_case(case.id, 300.0)
    states = [(s.state, s.rescore) for s in store.slides(case.id)]
    assert states == [("queued", 1), ("queued", 1), (REJECTED, 0)]  # c.tif: nothing to read
    assert store.case(case.id).state == "waiting"


def test_content_the_store_holds_already_is_recorded_as_its_copy(store: JobStore) -> None:
    held = store.add_waiting_slide("INBOX", "/in/a.tif", 10, 1.0, single=True, now=10.0)
    store.admit_slide(held.id, fingerprint="fa", bundle_hash=BUNDLE.sha256, size=10, mtime=1.0,
                      now=11.0)  # fmt: skip
    case = record(store, "P", [FinishedSlide("/demo/a.tif", DONE, fingerprint="fa")], 1, 20.0)
    assert store.slides(case.id)[0].duplicate_of == held.id


def test_a_case_the_service_has_work_on_is_not_overwritten(store: JobStore) -> None:
    row = store.add_waiting_slide("P", "/in/P/a.tif", 10, 1.0, single=False, now=10.0)
    store.admit_slide(row.id, fingerprint="fa", bundle_hash=BUNDLE.sha256, size=10, mtime=1.0,
                      now=11.0)  # fmt: skip
    for start in (False, True):  # its slide queued, then running
        if start:
            store.start_slide(row.id, 12.0)
        with pytest.raises(StoreError, match="in the service's queue"):
            record(store, "P", [FinishedSlide("/demo/a.tif", DONE, fingerprint="fb")], 1, 20.0)
    assert store.slide(row.id).state == RUNNING and store.slide_by_path("/demo/a.tif") is None
