"""A case collecting slides, end to end: a real ``cytoedge run`` over a case folder, the
window beside it says when the case will be scored unless more slides arrive, and
Score now (its button, and its keyboard shortcut) has the service score it at once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

from appliance.service.store import TERMINAL, WAITING, JobStore
from cytoedge_demo.samples import write_sample_site
from cytoedge_demo.synthetic import write_cell_folders
from gui.app import make_application
from gui.main_window import MainWindow, collecting_text
from gui.store_reader import CaseRow, SlideRow, StoreReader
from tests.runtime_models import TinyBundle
from tests.service_harness import ServiceProcess, copy_unit, result_versions, write_config

QUIET_S = 600.0  # a case's quiet period far longer than the test


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TinyBundle(tmp_path_factory.mktemp("tiny")).write().path


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patients")
    write_cell_folders(root, 2, 40, seed=41)
    return root


@pytest.fixture
def service(tmp_path: Path, bundle_dir: Path) -> Iterator[ServiceProcess]:
    config = write_config(tmp_path, bundle_dir, case_quiet_seconds=QUIET_S)
    running = ServiceProcess(config, tmp_path / "data" / "state")
    yield running
    running.ensure_stopped()


def body(window: MainWindow) -> str:
    return window.pane._message_body.text().replace("\u200b", "")


def slides_done(service: ServiceProcess, case_key: str) -> bool:
    case = service.case(case_key)
    slides = service.read(lambda s: s.slides(case.id)) if case else None
    return bool(slides) and all(s.state in TERMINAL for s in slides)  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_case_collecting_slides_says_when_it_is_scored_and_scores_now_when_asked(
    qtbot, service: ServiceProcess, patients: Path, tmp_path: Path
) -> None:
    service.start()
    inbox = tmp_path / "inbox"
    for case_key, patient in (("CASE-KEYS", "P0001"), ("CASE-BUTTON", "P0002")):
        (inbox / case_key).mkdir()
        copy_unit(patients / patient, inbox / case_key / patient)  # a slide of a case folder
    for case_key in ("CASE-KEYS", "CASE-BUTTON"):
        service.wait_for(lambda key=case_key: slides_done(service, key), 90, "slides processed")
        assert service.case_state(case_key) == WAITING  # no .ready: it waits for more slides

    make_application()
    window = MainWindow(
        service.store_path, tmp_path / "outbox", poll_ms=100, case_quiet_seconds=QUIET_S
    )
    qtbot.addWidget(window)
    window.resize(1280, 800)
    window.show()
    window.start()
    try:
        qtbot.waitUntil(lambda: window.model.rowCount() == 2, timeout=10_000)
        for case_key in ("CASE-KEYS", "CASE-BUTTON"):
            window.select_case(case_key)
            row = service.case(case_key)
            assert row is not None
            due = datetime.fromtimestamp(row.last_slide_at + QUIET_S).astimezone()
            assert window.pane._message_title.text().endswith(": waiting")
            assert f"It will be scored at {due:%H:%M} unless more slides arrive" in body(window)
            assert "Score now" in body(window)
            assert window.pane.score_now.isVisible() and window.pane.score_now.isEnabled()

        # The keyboard shortcut, on the window.
        window.select_case("CASE-KEYS")
        window.activateWindow()
        window.queue.setFocus()
        qtbot.keyClick(
            window.queue,
            Qt.Key.Key_N,
            Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier,
        )
        service.wait_for(lambda: service.case_state("CASE-KEYS") in TERMINAL, 30, "scored now")
        qtbot.waitUntil(lambda: window.pane.loaded is not None, timeout=10_000)
        assert window.pane.loaded.view.result.case_id == "CASE-KEYS"

        # The button, on the waiting case's page.
        window.select_case("CASE-BUTTON")
        qtbot.waitUntil(window.pane.score_now.isVisible, timeout=5000)
        qtbot.mouseClick(window.pane.score_now, Qt.MouseButton.LeftButton)
        service.wait_for(lambda: service.case_state("CASE-BUTTON") in TERMINAL, 30, "scored now")
        qtbot.waitUntil(lambda: window.pane.loaded is not None, timeout=10_000)
        assert window.pane.loaded.view.result.case_id == "CASE-BUTTON"
        assert not window.score_now_action.isEnabled()  # scored: nothing to hurry
    finally:
        window.close()
    for case_key in ("CASE-KEYS", "CASE-BUTTON"):
        assert result_versions(tmp_path / "outbox", case_key) == ["v1"]
    assert service.terminate() == 0


def test_score_now_that_cannot_be_written_says_why(qtbot, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store_file, outbox = write_sample_site(data)
    store = JobStore(store_file)
    try:  # a case folder of two processed slides, collecting more
        for number, name in enumerate(("a.svs", "b.svs")):
            slide = store.add_waiting_slide(
                "MM-9", f"/in/MM-9/{name}", 10, 1.0, single=False, now=100.0 + number
            )
            store.admit_slide(slide.id, fingerprint=f"f{number}", bundle_hash="b", size=10,
                              mtime=1.0, now=110.0)  # fmt: skip
            store.start_slide(slide.id, 120.0)
            store.finish_slide(slide.id, "done", n_cells=50, now=130.0)
    finally:
        store.close()
    make_application()
    window = MainWindow(store_file, outbox)
    qtbot.addWidget(window)
    window.show()
    window.apply_snapshot(window.reviews.annotate(StoreReader(store_file).poll()))
    window.select_case("MM-9")
    assert window.pane.score_now.isVisible() and window.score_now_action.isEnabled()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    window.store_path = blocker / "jobs.sqlite"  # its parent is a file: no store there
    with qtbot.waitSignal(window.relay.done, timeout=10_000) as outcome:
        window.pane.score_now.click()
    ok, message = outcome.args
    assert not ok and message.startswith("Could not ask to score MM-9 now")
    box = window.findChild(QMessageBox, "rescore_problem")
    assert box is not None and box.isVisible()
    box.close()


def case_row(slide_states: tuple[str, ...], **fields: object) -> CaseRow:
    slides = tuple(
        SlideRow(i, 1, f"/in/C/s{i}.svs", state, "", 0.0, None, "", None)
        for i, state in enumerate(slide_states)
    )
    values: dict = {
        "id": 1, "case_key": "C", "state": "waiting", "received_at": None,
        "updated_at": None, "stage": "", "progress": 0.0, "result_version": None,
        "result_dir": "", "reason": "", "attempts": 0, "slides": slides, **fields,
    }  # fmt: skip
    return CaseRow(**values)


def test_the_sentence_follows_the_service_s_rule() -> None:
    now = datetime(2026, 12, 6, 14, 30, tzinfo=UTC).astimezone()
    last = now - timedelta(minutes=2)
    at = f"{last + timedelta(minutes=5):%H:%M}"
    quiet = case_row(("done", "done"), last_slide_at=last)
    assert collecting_text(quiet, 300, now) == (
        f"It will be scored at {at} unless more slides arrive "
        "(it waits 5 min after its last slide)."
    )
    arriving = collecting_text(case_row(("done", "waiting"), last_slide_at=last), 300, now)
    assert arriving.startswith("Waiting for the scan files to finish arriving (s1.svs).")
    assert f"at {at} at the earliest" in arriving
    asked = case_row(("done", "done"), last_slide_at=last, ready=True)
    assert collecting_text(asked, 300, now) == (
        "It will be scored as soon as the service takes it up."
    )
    over = case_row(("done",), last_slide_at=now - timedelta(minutes=6))
    assert (
        collecting_text(over, 300, now) == "It will be scored as soon as the service takes it up."
    )
    loose = case_row(("running",), single=True)
    assert collecting_text(loose, 300, now) == "It will be scored once its slides are processed."
    assert not loose.collecting and quiet.collecting and not asked.collecting
