"""The whole window: selection, live updates, re-score, fitting 1280x800, screenshots."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QAbstractButton, QLabel, QMessageBox, QTabBar

from appliance.service.store import JobStore
from cytoedge_demo.samples import SampleCase, add_case, write_sample_result, write_sample_site
from cytoedge_demo.screenshots import render_screenshots
from gui.app import SCREEN_SIZE, InProcessService, make_application
from gui.main_window import MainWindow, read_about, service_text
from gui.models import QueueModel
from gui.store_reader import ServiceInfo, StoreReader


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_sample_site(tmp_path_factory.mktemp("site"))


def open_window(qtbot, store: Path, outbox: Path, **kwargs) -> MainWindow:
    make_application()
    window = MainWindow(store, outbox, version="9.9.9", **kwargs)
    qtbot.addWidget(window)
    window.resize(*SCREEN_SIZE)
    window.show()
    snapshot = StoreReader(store).poll()
    assert snapshot is not None
    window.apply_snapshot(window.reviews.annotate(snapshot))
    return window


def showing(window: MainWindow, case_key: str) -> bool:
    loaded = window.pane.loaded
    return loaded is not None and loaded.view.result.case_id == case_key


def test_selecting_a_done_case_shows_its_result_and_enables_its_buttons(qtbot, site) -> None:
    window = open_window(qtbot, *site)
    assert window.model.rowCount() == 9
    assert not window.buttons["report"].isEnabled()  # nothing selected yet
    window.select_case("MM-2611-0416")
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0416"), timeout=5000)
    assert window.buttons["report"].isEnabled() and window.buttons["folder"].isEnabled()
    assert window.pane.loaded.view.report.name == "report.html"
    assert "lab-scanner-01" in window.status_label.text()
    assert not window.buttons["pause"].isVisible()  # no in-process service


def test_cases_without_a_result_say_where_they_are(qtbot, site) -> None:
    window = open_window(qtbot, *site)
    window.select_case("MM-2611-0418")
    assert window.pane._message_title.text() == "MM-2611-0418: running"
    assert "segmentation (42 %)" in window.pane._message_body.text()
    assert not window.buttons["report"].isEnabled()
    assert not window.buttons["rescore"].isEnabled()  # running: nothing to re-score yet
    window.select_case("MM-2611-0412")
    assert "failed after 3 attempts" in window.pane._message_title.text()
    assert "truncated file" in window.pane._message_body.text()
    assert window.buttons["rescore"].isEnabled()


def test_selecting_a_slide_shows_its_heatmap(qtbot, site) -> None:
    window = open_window(qtbot, *site)
    window.select_case("MM-2611-0416")
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0416"), timeout=5000)
    case_index = window.queue.currentIndex()
    window.queue.setCurrentIndex(window.model.index(2, 0, case_index))
    assert window.pane.slide_choice.currentText() == "0416_3.svs"


def test_the_view_updates_when_a_job_changes_state(qtbot, tmp_path: Path) -> None:
    store_path = tmp_path / "state" / "jobs.sqlite"
    outbox = tmp_path / "outbox"
    store = JobStore(store_path)
    running = SampleCase("LIVE-1", "running", 1, ("l1.svs",), stage="embedding", progress=0.3)
    case_id = add_case(store, running, now=time.time())
    window = MainWindow(store_path, outbox, poll_ms=50)
    qtbot.addWidget(window)
    window.show()
    window.start()
    try:
        qtbot.waitUntil(lambda: window.model.rowCount() == 1, timeout=5000)
        window.select_case("LIVE-1")
        assert window.pane._message_title.text() == "LIVE-1: running"
        # The worker finishes the slide, then the case, and writes the result.
        slide = store.slides(case_id)[0]
        store.finish_slide(slide.id, "done", n_cells=300, now=time.time())
        store.set_case_ready(case_id, True, time.time())
        store.promote_ready_cases(0.0, time.time())
        store.start_case(case_id, 1, time.time())
        result = write_sample_result(outbox, "LIVE-1", "mm_negative", ("l1.svs",))
        store.finish_case(
            case_id,
            "done",
            reason="",
            result_version=1,
            result_dir=str(result.path),
            now=time.time(),
        )
        qtbot.waitUntil(
            lambda: window.model.index(0, QueueModel.STATE).data() == "done", timeout=5000
        )
        qtbot.waitUntil(lambda: showing(window, "LIVE-1"), timeout=5000)
        assert window.buttons["report"].isEnabled()
    finally:
        window.close()
        store.close()
    assert not window.polling.thread.isRunning()


def test_rescore_flags_the_case_in_the_store(qtbot, site, tmp_path: Path) -> None:
    data = tmp_path / "copy"
    shutil.copytree(site[0].parent.parent, data)
    store_path = data / "state" / "jobs.sqlite"
    window = open_window(qtbot, store_path, data / "outbox")
    window.select_case("MM-2611-0414")
    with qtbot.waitSignal(window.relay.done, timeout=10_000) as outcome:
        window.request_rescore(window.selected_case())
    assert outcome.args == [True, "MM-2611-0414 will be scored again."]
    conn = sqlite3.connect(store_path)
    state, ready = conn.execute(
        "SELECT state, ready FROM cases WHERE case_key = 'MM-2611-0414'"
    ).fetchone()
    flags = conn.execute(
        "SELECT s.rescore, s.state FROM slides s JOIN cases c ON c.id = s.case_id "
        "WHERE c.case_key = 'MM-2611-0414'"
    ).fetchall()
    conn.close()
    assert (state, ready) == ("waiting", 1)
    assert flags == [(1, "queued"), (1, "queued")]


def test_a_rescore_that_cannot_be_written_says_why(qtbot, site, tmp_path: Path) -> None:
    window = open_window(qtbot, *site)
    window.select_case("MM-2611-0414")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    window.store_path = blocker / "jobs.sqlite"  # its parent is a file: no store there
    with qtbot.waitSignal(window.relay.done, timeout=10_000) as outcome:
        window.request_rescore(window.selected_case())
    ok, message = outcome.args
    assert not ok and message.startswith("Could not ask for a re-score of MM-2611-0414")
    box = window.findChild(QMessageBox, "rescore_problem")
    assert box is not None and box.isVisible()
    box.close()


def test_nothing_is_cut_off_at_1280x800(qtbot, site) -> None:
    window = open_window(qtbot, *site)
    for case_key in ("MM-2611-0416", "PB-2611-0101", "MM-2611-0415", "MM-2611-0413"):
        window.select_case(case_key)
        qtbot.waitUntil(lambda key=case_key: showing(window, key), timeout=5000)
        qtbot.wait(20)
        clipped = []
        for widget in window.findChildren(QLabel) + window.findChildren(QAbstractButton):
            if not widget.isVisibleTo(window) or (
                isinstance(widget, QLabel) and (widget.wordWrap() or widget.pixmap())
            ):
                continue
            if widget.width() < widget.minimumSizeHint().width():
                clipped.append((type(widget).__name__, widget.text(), widget.width()))
        for bar in window.findChildren(QTabBar):
            for tab in range(bar.count()):
                if bar.tabRect(tab).width() < bar.fontMetrics().horizontalAdvance(
                    bar.tabText(tab).replace("&", "")
                ):
                    clipped.append(("tab", bar.tabText(tab), bar.tabRect(tab).width()))
        assert clipped == [], case_key
    header = window.queue.header()
    for column in range(window.model.columnCount()):
        assert header.sectionSize(column) >= window.queue.sizeHintForColumn(column)
    assert window.font().pointSize() >= 12


def test_keyboard_only_use(qtbot, site) -> None:
    window = open_window(qtbot, *site)
    shortcuts = {
        action.text(): action.shortcut().toString()
        for action in (
            window.report_action,
            window.folder_action,
            window.rescore_action,
            window.about_action,
        )
    }
    assert all(shortcuts.values()) and len(set(shortcuts.values())) == len(shortcuts)
    window.activateWindow()
    window.queue.setFocus()
    qtbot.keyClick(window.queue, Qt.Key.Key_Down)
    assert window.selected_case() is not None  # arrow keys walk the queue
    qtbot.keyClick(window.queue, Qt.Key.Key_Tab)
    assert window.focusWidget() in window.buttons.values()


def test_about_shows_version_and_bundle_provenance(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(
        json.dumps(
            {
                "name": "mm-heads",
                "version": "2.1",
                "intended_use": "demo",
                "created": "2026-11-20",
                "provenance": {"source_sha256": "ab12", "validation": {"mean_auc": 0.81}},
            }
        )
    )
    text = read_about(bundle, None, "0.1.0")
    assert "cytoedge 0.1.0" in text and "mm-heads 2.1" in text
    assert "source sha256" in text and "mean_auc: 0.81" in text
    assert "Demo model, not for diagnosis" in text
    assert "No bundle at" in read_about(tmp_path / "none", None, "0.1.0")


def test_the_status_line_tells_a_silent_service_from_a_live_one() -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    info = ServiceInfo(1, "host-a", now, now - timedelta(seconds=3), "b 1", "ort-cpu", "0.1")
    assert service_text(info, now) == "Service on host-a running · b 1 · ort-cpu"
    stale = ServiceInfo(1, "host-a", now, now - timedelta(minutes=5), "b 1", "ort-cpu", "0.1")
    assert "not responding" in service_text(stale, now)
    assert service_text(None, now).startswith("No service")


def test_an_in_process_service_runs_on_its_own_thread_and_pauses(qtbot, tmp_path: Path) -> None:
    class FakeService:
        def __init__(self) -> None:
            self.watching_paused = threading.Event()
            self.thread_name = ""

        def run(self, stop: threading.Event) -> bool:
            self.thread_name = threading.current_thread().name
            stop.wait(10)
            return True

    fake = FakeService()
    service = InProcessService(fake)
    service.start()
    qtbot.waitUntil(lambda: fake.thread_name != "", timeout=2000)
    assert fake.thread_name == "cytoedge-service"
    window = MainWindow(tmp_path / "jobs.sqlite", tmp_path, service=service)
    qtbot.addWidget(window)
    window.show()
    assert window.buttons["pause"].isVisible()
    window.buttons["pause"].click()
    assert fake.watching_paused.is_set()
    assert window.buttons["pause"].text() == "Resume &watching"
    window.buttons["pause"].click()
    assert not fake.watching_paused.is_set()
    assert service.stop(5)
    assert not InProcessService(
        object.__new__(type("Bare", (), {"run": FakeService.run}))
    ).can_pause


def test_screenshots_render_a_done_and_a_rejected_case(tmp_path: Path) -> None:
    written = render_screenshots(tmp_path)
    assert [p.name for p in written] == ["done.png", "rejected.png"]
    for path in written:
        image = QImage(str(path))
        assert (image.width(), image.height()) == SCREEN_SIZE
