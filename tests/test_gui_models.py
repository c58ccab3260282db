"""The queue: read-only store access, the tree model's merges, live polling."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QPersistentModelIndex, Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QTreeView

from appliance.service.store import JobStore, StoreError
from cytoedge_demo.samples import SampleCase, add_case
from gui.models import (
    PROGRESS_ROLE,
    PollingThread,
    QueueDelegate,
    QueueModel,
    format_received,
    state_text,
)
from gui.review_state import ReviewIndex
from gui.store_reader import CaseRow, StoreReader, StoreUnavailableError, queue_of


def reviews_beside(store: Path) -> ReviewIndex:
    """The review states of a data directory laid out as the service lays it out."""
    data = store.parent.parent
    return ReviewIndex(data / "outbox", data, store.parent / "audit.jsonl")


NOW = 1_800_000_000.0


def fixture_store(path: Path) -> sqlite3.Connection:
    """The service's store with three cases; returns a plain writer for direct edits."""
    store = JobStore(path)
    add_case(store, SampleCase("OLD", "done", 120, ("a.svs", "b.svs")), now=NOW)
    add_case(
        store,
        SampleCase("NEW", "running", 1, ("c.svs",), stage="segmentation", progress=0.42),
        now=NOW,
    )
    add_case(store, SampleCase("MID", "rejected", 30, ("d.svs",), reason="QC failed"), now=NOW)
    store.close()
    return sqlite3.connect(path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "state" / "jobs.sqlite"
    conn = fixture_store(path)
    yield path, conn
    conn.close()


def read_queue(path: Path) -> list[CaseRow]:
    """The queue through the store's own read-only API, as the window reads it."""
    reader = JobStore(path, readonly=True)
    try:
        return queue_of(reader.snapshot()).cases
    finally:
        reader.close()


def test_queue_is_newest_first_with_slides_in_arrival_order(store) -> None:
    path, _ = store
    queue = read_queue(path)
    assert [c.case_key for c in queue] == ["NEW", "MID", "OLD"]
    old = queue[2]
    assert [s.name for s in old.slides] == ["a.svs", "b.svs"]
    assert old.received_at is not None and old.received_at.timestamp() == NOW - 120 * 60
    assert queue[0].state == "waiting"  # still collecting slides, while one is processed
    assert queue[0].shown == ("running", "segmentation", pytest.approx(0.42))
    assert queue[1].reason == "QC failed"


def test_the_window_cannot_write_to_the_store(store) -> None:
    path, _ = store
    reader = JobStore(path, readonly=True)
    case = reader.case_by_key("OLD")
    assert case is not None
    with pytest.raises(StoreError, match="read-only"):
        reader.request_rescore_case(case.id, NOW)
    reader.close()


def test_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError, match="has the service run yet"):
        StoreReader(tmp_path / "nope.sqlite").poll()


def test_poll_returns_the_queue_only_after_another_connection_commits(store) -> None:
    path, writer = store
    reader = StoreReader(path)
    first = reader.poll()
    assert first is not None and [c.case_key for c in first.cases] == ["NEW", "MID", "OLD"]
    assert reader.poll() is None  # nothing committed since
    writer.execute("UPDATE cases SET state = 'done', stage = '' WHERE case_key = 'NEW'")
    writer.commit()
    changed = reader.poll()
    assert changed is not None and changed.cases[0].state == "done"
    assert reader.poll() is None


def test_store_times_become_aware_datetimes(store) -> None:
    path, writer = store
    writer.execute("UPDATE cases SET received_at = ? WHERE case_key = 'OLD'", (NOW + 3600,))
    writer.commit()
    queue = read_queue(path)
    assert queue[0].case_key == "OLD"  # now the most recently received
    assert queue[0].received_at is not None and queue[0].received_at.tzinfo is not None
    assert queue[0].received_at.timestamp() == NOW + 3600


def test_state_and_time_texts() -> None:
    assert state_text("running", "stain_normalisation") == "running: stain normalisation"
    assert state_text("done", "heads") == "done"
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert format_received(now - timedelta(minutes=5), now) == (
        (now - timedelta(minutes=5)).astimezone().strftime("%H:%M")
    )
    assert format_received(now - timedelta(days=3), now).count(" ") == 2  # "24 Nov 12:00"
    assert format_received(None, now) == ""


def test_model_shows_cases_and_slides(qtmodeltester, store) -> None:
    path, _ = store
    model = QueueModel()
    model.apply(read_queue(path))
    qtmodeltester.check(model)
    assert model.rowCount() == 3
    new = model.index(0, 0)
    assert new.data() == "NEW"
    assert model.index(0, QueueModel.STATE).data() == "running: segmentation · 42 %"
    assert model.index(0, QueueModel.STATE).data(PROGRESS_ROLE) == pytest.approx(0.42)
    assert model.index(1, QueueModel.STATE).data(PROGRESS_ROLE) is None
    old = model.index(2, 0)
    assert model.rowCount(old) == 2
    slide = model.index(1, 0, old)
    assert slide.data() == "b.svs"
    assert model.parent(slide) == old
    assert model.case_at(slide).case_key == "OLD"
    assert model.slide_at(slide).name == "b.svs"
    assert "QC failed" in model.index(1, 0).data(Qt.ItemDataRole.ToolTipRole)


def test_merges_keep_selection_and_use_row_signals_not_resets(qtbot, qtmodeltester, store) -> None:
    path, writer = store
    model = QueueModel()
    reader = StoreReader(path)
    model.apply(reader.poll().cases)
    qtmodeltester.check(model)
    kept = QPersistentModelIndex(model.index(1, 0))  # MID
    resets, inserted, changed = [], [], []
    model.modelReset.connect(lambda: resets.append(1))
    model.rowsInserted.connect(
        lambda parent, first, last: inserted.append((parent.isValid(), first))
    )
    model.dataChanged.connect(lambda tl, br, roles=(): changed.append(tl.row()))

    service = JobStore(path)
    add_case(service, SampleCase("NEWEST", "queued", 0, ("e.svs",)), now=NOW)  # on top
    service.close()
    writer.execute("UPDATE cases SET state = 'done' WHERE case_key = 'NEW'")
    old_id = writer.execute("SELECT id FROM cases WHERE case_key = 'OLD'").fetchone()[0]
    writer.execute(
        "INSERT INTO slides (case_id, path, state, seen_at) VALUES (?, 'late.svs', 'queued', ?)",
        (old_id, NOW),
    )
    writer.commit()
    model.apply(reader.poll().cases)

    assert resets == []
    assert (False, 0) in inserted  # the new case, at the top
    assert (True, 2) in inserted  # the late slide, after OLD's two slides
    assert kept.isValid() and kept.row() == 2 and kept.data() == "MID"
    assert [model.index(r, 0).data() for r in range(4)] == ["NEWEST", "NEW", "MID", "OLD"]
    assert model.index(1, QueueModel.STATE).data() == "done"
    assert 1 in changed
    assert model.rowCount(model.index(3, 0)) == 3

    writer.execute("DELETE FROM slides WHERE case_id = (SELECT id FROM cases WHERE case_key='MID')")
    writer.execute("DELETE FROM cases WHERE case_key = 'MID'")
    writer.commit()
    model.apply(reader.poll().cases)
    assert [model.index(r, 0).data() for r in range(model.rowCount())] == ["NEWEST", "NEW", "OLD"]
    assert not kept.isValid()
    assert resets == []


def test_progress_bar_is_painted_for_running_rows(qtbot, store) -> None:
    path, writer = store
    model = QueueModel()
    reader = StoreReader(path)
    model.apply(reader.poll().cases)
    view = QTreeView()
    view.setModel(model)
    view.setItemDelegate(QueueDelegate(view))
    view.resize(900, 300)
    qtbot.addWidget(view)
    view.show()

    def progress_cell() -> QImage:
        rect = view.visualRect(model.index(0, QueueModel.STATE))
        return view.viewport().grab(rect).toImage()

    low = progress_cell()
    writer.execute("UPDATE slides SET progress = 0.95 WHERE state = 'running'")
    writer.commit()
    model.apply(reader.poll().cases)
    high = progress_cell()
    assert model.index(0, QueueModel.STATE).data() == "running: segmentation · 95 %"
    assert low != high  # the bar grew


def test_the_view_follows_the_store_through_the_polling_thread(qtbot, store) -> None:
    path, writer = store
    model = QueueModel()
    polling = PollingThread(path, reviews_beside(path), interval_ms=50)
    polling.poller.snapshot.connect(lambda snapshot: model.apply(snapshot.cases))
    polling.start()
    try:
        qtbot.waitUntil(lambda: model.rowCount() == 3, timeout=5000)
        assert model.index(0, QueueModel.STATE).data() == "running: segmentation · 42 %"
        writer.execute("UPDATE cases SET state = 'done', stage = '' WHERE case_key = 'NEW'")
        writer.commit()
        qtbot.waitUntil(lambda: model.index(0, QueueModel.STATE).data() == "done", timeout=5000)
    finally:
        polling.stop()
    assert not polling.thread.isRunning()


def test_the_poller_reports_a_missing_store_then_recovers(qtbot, tmp_path: Path) -> None:
    path = tmp_path / "state" / "jobs.sqlite"
    model = QueueModel()
    problems: list[str] = []
    polling = PollingThread(path, reviews_beside(path), interval_ms=50)
    polling.poller.snapshot.connect(lambda snapshot: model.apply(snapshot.cases))
    polling.poller.unavailable.connect(problems.append)
    polling.start()
    try:
        qtbot.waitUntil(lambda: len(problems) == 1, timeout=5000)
        assert "no job store" in problems[0]
        time.sleep(0.1)
        assert len(problems) == 1  # said once, not on every poll
        fixture_store(path).close()
        qtbot.waitUntil(lambda: model.rowCount() == 3, timeout=5000)
        assert problems[-1] == ""  # the problem cleared
    finally:
        polling.stop()
