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
from PySide6.QtWidgets import QMessageBox

from appliance.pipeline import fields, qc
from appliance.pipeline.cases import abstain_reason
from appliance.readers import ScanError, open_scan, single_field
from appliance.results import (
    SCHEMA_VERSION,
    BundleRecord,
    CaseContent,
    CaseOutputs,
    CaseResult,
    ResultFolder,
    ScanRecord,
    read_result,
    write_case_result,
)
from appliance.service.pause import damaged_text
from appliance.service.store import JobStore
from appliance.site.pause_note import PauseNote
from cytoedge_demo.samples import SampleCase, add_case, write_sample_result, write_sample_site
from cytoedge_demo.screenshots import render_screenshots
from gui.app import SCREEN_SIZE, InProcessService, make_application
from gui.main_window import MainWindow, read_about, service_text
from gui.models import QueueModel
from gui.store_reader import ServiceInfo, StoreReader
from runtime.bundle_format import QcSpec
from runtime.files import sha256_file
from tests.conftest import SHARED_DATA
from tests.gui_checks import clipped_once_settled


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


def test_a_result_of_another_case_is_never_shown_under_a_case_s_name(qtbot, tmp_path: Path) -> None:
    """Case "P_001"'s store row names a folder that holds case "P 001"'s result (as an
    earlier release's shared ``P_001/`` folder did): the window refuses it."""
    outbox, store_path = tmp_path / "outbox", tmp_path / "jobs.sqlite"
    other = write_sample_result(outbox, "P 001", "mm_positive", ("a.svs",), write_pdf=False)
    store = JobStore(store_path)
    for key in ("P 001", "P_001"):
        store.record_finished_case(
            key, [], state="done", reason="", result_version=1, result_dir=str(other.path),
            bundle_hash="a" * 64, now=time.time(),
        )  # fmt: skip
    store.close()
    window = open_window(qtbot, store_path, outbox)
    window.select_case("P_001")
    qtbot.waitUntil(lambda: window.pane._message_title.text() == "Result not readable")
    assert "holds a result of case 'P 001', not of case 'P_001'" in window.pane._message_body.text()
    assert window.pane.loaded is None
    window.select_case("P 001")
    qtbot.waitUntil(lambda: showing(window, "P 001"), timeout=5000)


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
        assert clipped_once_settled(window) == [], case_key  # queue columns included
    assert window.font().pointSize() >= 12


# --- the longest reasons the pipeline produces, from real failures -----------------------

PHOTOS = SHARED_DATA / "chula-sample"
BCCD = SHARED_DATA / "bccd-sample"


def real_scan(photo: Path, pixel_size_um: float) -> ScanRecord:
    """A real photo as the pipeline judges it before segmentation: a slide of one field,
    its stains estimated and the field's QC (a slide that fails QC stops there)."""
    params = qc.QCParams.of(QcSpec.current(), None)
    verdict = fields.judge(single_field(photo, pixel_size_um), params, None).record()
    with open_scan(photo, pixel_size_um) as scan:
        info = scan.info()
    return ScanRecord(
        slide_id=photo.stem, path=str(photo), sha256=sha256_file(photo), format=info.format,
        bytes=info.bytes, pixel_size_um=info.pixel_size_um, qc=verdict, cells=0,
        width=info.width, height=info.height, fields=1,
    )  # fmt: skip


def qc_failed_case(outbox: Path, case_key: str, scans: list[ScanRecord]) -> Path:
    """The result score_case writes when no slide passed QC: the case's reason is made by
    the pipeline's own rule from the slides' real QC reasons."""
    failures = [f"{s.slide_id}: {'; '.join(s.qc.reasons)}" for s in scans]
    reason = abstain_reason(0, 50, failures, len(scans), [])
    result = CaseResult(
        schema_version=SCHEMA_VERSION, case_id=case_key, version=0,
        created="2026-11-29T08:00:00+00:00", status="abstained", abstain_reason=reason,
        bundle=BundleRecord("cytoedge-demo", "1", "0" * 64, "demo"), backend="ort-cpu",
        scans=tuple(scans), heads=(), top_cells=(), attention_top20_mass=None,
        timings_s={}, outputs=CaseOutputs(report_html="report.html", cells_geojson=""),
    )  # fmt: skip
    folder, _ = write_case_result(outbox, CaseContent(result=result, slides=[]), write_pdf=False)
    return folder.path


@pytest.fixture(scope="module")
def real_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not (PHOTOS.is_dir() and BCCD.is_dir()):
        pytest.skip("shared data (chula-sample, bccd-sample) not present")
    data = tmp_path_factory.mktemp("real")
    outbox, store_path = data / "outbox", data / "state" / "jobs.sqlite"
    blurred = [real_scan(PHOTOS / f"{n}.jpg", 0.25) for n in (10, 11)]
    blurred.append(real_scan(BCCD / "BloodImage_00304.jpg", 1.0))
    # The pipeline's own reasons: a hair's grey taken for the stain, blur with low cellularity.
    assert [len(s.qc.reasons) for s in blurred] == [1, 1, 2]
    # Damaged copies of a real photo, refused by the reader with its own sentences.
    damaged = data / "inbox" / "20261129_081403_RBC_field_scan_0417_oil_100x_microscope_2"
    damaged.mkdir(parents=True)
    refused = []
    for name, cut in (("field_1.jpg", slice(0, 9000)), ("field_2.jpg", slice(16, None))):
        raw = (PHOTOS / "1.jpg").read_bytes()
        (damaged / name).write_bytes(raw[cut] if cut.start == 0 else bytes(16) + raw[cut])
        with pytest.raises(ScanError) as caught:
            open_scan(damaged / name, 0.25)
        refused.append(f"{name}: {caught.value.reason}")
    store = JobStore(store_path)
    now = time.time()
    cases = [
        ("PHOTO-QC-0419", blurred[:2], "rejected"),
        ("PHOTO-QC-0420", blurred, "rejected"),
        ("20261129_081255_BloodImage_00304_oil_immersion_100x_field_scan", blurred[2:], "rejected"),
    ]
    try:
        for minutes, (key, scans, state) in enumerate(cases):
            folder = qc_failed_case(outbox, key, scans)
            names = tuple(Path(s.path).name for s in scans)
            reason = read_result(folder).abstain_reason or ""
            sample = SampleCase(key, state, minutes, names, kind="qc_failed", reason=reason)
            add_case(store, sample, now=now, result=ResultFolder(folder.parent, 1, folder))
        add_case(
            store,
            SampleCase(
                damaged.name,
                "rejected",
                9,
                ("field_1.jpg", "field_2.jpg"),
                reason="; ".join(refused),
            ),
            now=now,
        )
    finally:
        store.close()
    return store_path, outbox


def test_the_longest_real_reasons_wrap_and_nothing_is_cut_off(qtbot, real_site) -> None:
    window = open_window(qtbot, *real_site)
    for case in window.model.cases():
        window.select_case(case.case_key)
        if case.result_dir:
            qtbot.waitUntil(lambda key=case.case_key: showing(window, key), timeout=5000)
            banner = window.pane.banner_box.itemAt(0).widget().text().replace("\u200b", "")
            assert banner == f"No call: {case.reason}"
            assert "slide QC failed: " in banner
        else:  # refused by the reader: its sentences, not "result not readable"
            assert window.pane._message_title.text().replace("\u200b", "").endswith(": rejected")
            assert "field_2.jpg: not an image" in window.pane._message_body.text()
        assert clipped_once_settled(window) == [], case.case_key
        assert window.width() == SCREEN_SIZE[0]


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
    full = "data disk full: 3 MB free, needs about 45 MB"
    assert service_text(info, now, paused=full) == f"Service on host-a: {full}"


def test_the_status_line_says_why_the_service_holds_its_work(qtbot, tmp_path: Path) -> None:
    state = tmp_path / "data" / "state"
    store = JobStore(state / "jobs.sqlite")
    store.register_service(1, "host-a", "b 1", "ort-cpu", "0.1", time.time())
    store.close()
    window = MainWindow(state / "jobs.sqlite", tmp_path / "outbox", poll_ms=50)
    qtbot.addWidget(window)
    window.show()
    window.start()
    note = PauseNote(state)
    note.say(damaged_text("bundle file encoder.int8.onnx does not match its sha256 (damaged)"))
    qtbot.waitUntil(lambda: "encoder.int8.onnx" in window.status_label.text(), timeout=5000)
    assert "choose another with `cytoedge bundle use`" in window.status_label.text()
    note.say("")
    qtbot.waitUntil(lambda: "encoder.int8.onnx" not in window.status_label.text(), timeout=5000)
    window.close()


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


def test_screenshots_draw_a_review_and_sign_it_off(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _, outbox = write_sample_site(data)
    written = render_screenshots(tmp_path / "pictures", data)
    assert [p.name for p in written] == ["review.png", "signed-off.png", "rejected.png"]
    for path in written:
        image = QImage(str(path))
        assert (image.width(), image.height()) == SCREEN_SIZE
    signed = read_result(outbox / "MM-2611-0416" / "v2")  # the first case waiting
    assert signed.review is not None and signed.review.decision == "sent_for_fish"
    assert (data / "fhir-outbox" / "MM-2611-0416-v2.json").is_file()


def test_the_live_screenshot_command_has_its_parts() -> None:
    # `cytoedge demo live-screenshot` runs a whole service; its module must at least
    # import against the window and the screenshot helpers it shares.
    from cytoedge_demo.live_screenshot import TABS, render_live_screenshot

    assert callable(render_live_screenshot)
    assert set(TABS) == {"cells", "heatmap", "slides"}
