"""Review and sign-off in the window, by keyboard alone: the filter, the next case to
review, the three decisions, the new version, the audit line, the queue catching up."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

import appliance.results.schema as schema_module
from appliance.results import read_result, write_case_result
from appliance.review.sign_off import SignOff, sign_off
from appliance.service.audit import AuditLog, read_audit
from cytoedge_demo.samples import sample_content, write_sample_site
from gui.app import SCREEN_SIZE, make_application
from gui.main_window import MainWindow
from gui.models import QueueModel
from gui.review_state import ReviewIndex
from gui.review_view import SignOffDialog, split_entries
from gui.store_reader import StoreReader
from tests.gui_checks import clipped_once_settled

CTRL_SHIFT = Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier
REVIEWER = "Dr Ana Reviewer"
TO_REVIEW = {"MM-2611-0416", "MM-2611-0415", "MM-2611-0413"}  # indeterminate, QC, too few


@pytest.fixture(scope="module")
def sample_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("site")
    write_sample_site(data)
    return data


@pytest.fixture
def data(sample_site: Path, tmp_path: Path) -> Path:
    """A copy of the sample site for this test to sign off in; its store's result folders
    (absolute paths) moved with it."""
    copy = tmp_path / "data"
    shutil.copytree(sample_site, copy)
    with contextlib.closing(sqlite3.connect(copy / "state" / "jobs.sqlite")) as conn, conn:
        conn.execute(
            "UPDATE cases SET result_dir = replace(result_dir, ?, ?)",
            (str(sample_site), str(copy)),
        )
    return copy


def open_window(qtbot, data: Path, **kwargs) -> MainWindow:
    make_application()
    store = data / "state" / "jobs.sqlite"
    window = MainWindow(store, data / "outbox", fhir_outbox=data / "fhir-outbox", **kwargs)
    qtbot.addWidget(window)
    window.resize(*SCREEN_SIZE)
    window.show()
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)  # shortcuts go to the active window
    snapshot = StoreReader(store).poll()
    assert snapshot is not None
    window.apply_snapshot(window.reviews.annotate(snapshot))
    return window


def refresh(window: MainWindow) -> None:
    """What the polling thread does once a second, done here at once."""
    window.reviews.refresh()
    snapshot = StoreReader(window.store_path).poll()
    assert snapshot is not None
    window.apply_snapshot(window.reviews.annotate(snapshot))


def visible_cases(window: MainWindow) -> set[str]:
    return {
        case.case_key
        for row, case in enumerate(window.model.cases())
        if not window.queue.isRowHidden(row, window.model.index(row, 0).parent())
    }


def review_column(window: MainWindow) -> dict[str, str]:
    return {
        case.case_key: window.model.index(row, QueueModel.REVIEW).data()
        for row, case in enumerate(window.model.cases())
    }


def showing(window: MainWindow, case_key: str, version: int) -> bool:
    loaded = window.pane.loaded
    return (
        loaded is not None
        and loaded.view.result.case_id == case_key
        and loaded.view.result.version == version
    )


def test_what_waits_is_marked_and_the_filter_keeps_only_it(qtbot, data: Path) -> None:
    window = open_window(qtbot, data)
    column = review_column(window)
    assert {k for k, v in column.items() if v == "to review"} == TO_REVIEW
    assert column["MM-2611-0414"] == ""  # clean calls, verified bundle: needs nobody
    assert column["MM-2611-0418"] == ""  # still running: nothing to review yet
    assert "(3)" in window.review_filter.text()
    window.queue.setFocus()
    qtbot.keyClick(window.queue, Qt.Key.Key_T, Qt.KeyboardModifier.ControlModifier)
    assert window.review_filter.isChecked()
    assert visible_cases(window) == TO_REVIEW
    qtbot.keyClick(window.queue, Qt.Key.Key_T, Qt.KeyboardModifier.ControlModifier)
    assert len(visible_cases(window)) == window.model.rowCount()


def test_without_a_verified_bundle_every_result_waits(qtbot, data: Path) -> None:
    shutil.rmtree(data / "verification")
    window = open_window(qtbot, data)
    waiting = {k for k, v in review_column(window).items() if v == "to review"}
    assert waiting == TO_REVIEW | {"MM-2611-0414", "PB-2611-0101"}
    window.select_case("MM-2611-0414")
    assert "not verified on this site" in window.pane.review_bar.text.text()


def test_keyboard_only_review_and_sign_off(qtbot, data: Path) -> None:
    window = open_window(qtbot, data)
    window.queue.setFocus()
    qtbot.keyClick(window.queue, Qt.Key.Key_T, Qt.KeyboardModifier.ControlModifier)
    first = window.selected_case()  # the filter selects the first case waiting
    assert first is not None and first.case_key == "MM-2611-0416"  # newest first
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0416", 1), timeout=5000)
    assert "To review:" in window.pane.review_bar.text.text()
    assert "indeterminate: t(11;14)" in window.pane.review_bar.text.text()
    # The reviewer looks at the cells and the heatmap without leaving the keyboard.
    qtbot.keyClick(window.queue, Qt.Key.Key_2, Qt.KeyboardModifier.ControlModifier)
    assert window.pane.tabs.hasFocus()
    qtbot.keyClick(window.pane.tabs.tabBar(), Qt.Key.Key_Right)
    assert window.pane.tabs.currentIndex() == 1 and not window.pane.heatmap.pixmap().isNull()

    # Reject: the name is asked (the login offered), a reason is required.
    qtbot.keyClick(window.pane.tabs, Qt.Key.Key_X, CTRL_SHIFT)
    dialog = window.findChild(SignOffDialog)
    assert dialog is not None and dialog.isVisible() and dialog.decision == "rejected"
    qtbot.waitUntil(dialog.name.hasFocus, timeout=5000)
    qtbot.keyClicks(dialog.name, REVIEWER)  # the offered login is selected: typed over
    qtbot.keyClick(dialog.name, Qt.Key.Key_Return)
    assert dialog.isVisible() and not dialog.ok.isEnabled()  # no reason yet: nothing signed
    qtbot.keyClick(dialog.name, Qt.Key.Key_Tab)
    qtbot.keyClicks(dialog.reason, "t(11;14) indeterminate on a thick smear: rescan")
    with qtbot.waitSignal(window.relay.signed, timeout=30_000) as signed:
        qtbot.keyClick(dialog.reason, Qt.Key.Key_Return)
    ok, message, folder, _ = signed.args
    assert ok, message
    assert message == f"MM-2611-0416 rejected by {REVIEWER} (version 2)."
    v2 = read_result(Path(folder))
    assert Path(folder).name == "v2" and v2.review is not None
    assert (v2.review.decision, v2.review.reviewer, v2.review.reviewed_version) == (
        "rejected",
        REVIEWER,
        1,
    )
    assert v2.review.reason == "t(11;14) indeterminate on a thick smear: rescan"
    assert read_result(Path(folder).parent / "v1").review is None
    report = (Path(folder) / "report.html").read_text()
    assert "Rejected" in report and REVIEWER in report
    assert (data / "fhir-outbox" / "MM-2611-0416-v2.json").is_file()
    (line,) = read_audit(data / "state" / "audit.jsonl")
    assert (line["event"], line["case"], line["decision"], line["source"]) == (
        "signed_off",
        "MM-2611-0416",
        "rejected",
        "window",
    )
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0416", 2), timeout=5000)
    assert "Rejected</b> by Dr Ana Reviewer" in window.pane.review_bar.text.text()

    # The queue catches up: no longer waiting, so the filter hides it.
    refresh(window)
    assert review_column(window)["MM-2611-0416"] == "rejected"
    assert visible_cases(window) == TO_REVIEW - {"MM-2611-0416"}
    assert clipped_once_settled(window) == []

    # The next one: the name is remembered for the session, Enter accepts.
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)
    window.queue.setFocus()
    qtbot.keyClick(window.queue, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    case = window.selected_case()
    assert case is not None and case.case_key in TO_REVIEW - {"MM-2611-0416"}
    qtbot.keyClick(window.queue, Qt.Key.Key_A, CTRL_SHIFT)
    dialog = window.findChild(SignOffDialog)  # the first one is gone
    assert dialog is not None and dialog.decision == "accepted"
    assert dialog.name.text() == REVIEWER
    qtbot.waitUntil(dialog.reason.hasFocus, timeout=5000)
    with qtbot.waitSignal(window.relay.signed, timeout=30_000) as signed:
        qtbot.keyClick(dialog.reason, Qt.Key.Key_Return)
    assert signed.args[0], signed.args[1]
    assert read_result(Path(signed.args[2])).review.decision == "accepted"


def test_escape_cancels_and_nothing_is_written(qtbot, data: Path) -> None:
    window = open_window(qtbot, data)
    window.select_case("MM-2611-0413")
    dialog = window.ask_sign_off("sent_for_fish")
    assert dialog is not None and dialog.windowTitle() == "Send for FISH: case MM-2611-0413"
    qtbot.keyClick(dialog.name, Qt.Key.Key_Escape)
    assert not dialog.isVisible()
    assert sorted(p.name for p in (data / "outbox" / "MM-2611-0413").iterdir()) == [
        "latest.json",
        "v1",
    ]
    assert not (data / "state" / "audit.jsonl").exists()


def test_a_sign_off_that_cannot_be_written_says_why(qtbot, data: Path) -> None:
    window = open_window(qtbot, data)
    window.select_case("MM-2611-0413")
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0413", 1), timeout=5000)
    # The service scored the case again while the reviewer looked at version 1.
    write_case_result(
        data / "outbox", sample_content("MM-2611-0413", "mm_negative", ("a.svs",)), write_pdf=False
    )
    dialog = window.ask_sign_off("accepted")
    assert dialog is not None
    dialog.name.setText(REVIEWER)
    with qtbot.waitSignal(window.relay.signed, timeout=30_000) as signed:
        dialog.ok.click()
    ok, message, _, _ = signed.args
    assert not ok
    assert message.startswith("Could not sign off MM-2611-0413: case MM-2611-0413 has a newer")
    box = window.findChild(QMessageBox, "sign_off_problem")
    assert box is not None and box.isVisible()
    box.close()


def test_a_sign_off_elsewhere_reaches_the_queue_through_the_audit_trail(qtbot, data: Path) -> None:
    window = open_window(qtbot, data, poll_ms=50)
    window.start()
    try:
        qtbot.waitUntil(lambda: review_column(window)["MM-2611-0413"] == "to review", timeout=5000)
        # Another workstation signs version 1 off (a new version and an audit line).
        folder = data / "outbox" / "MM-2611-0413" / "v1"
        audit = AuditLog(data / "state" / "audit.jsonl", source="window")
        sign_off(folder, SignOff("sent_for_fish", "Dr B"), data_dir=data, audit=audit,
                 write_pdf=False)  # fmt: skip
        qtbot.waitUntil(lambda: review_column(window)["MM-2611-0413"] == "for FISH", timeout=5000)
        window.review_filter.setChecked(False)
        window.select_case("MM-2611-0418")  # the running case: its progress bar in full
        qtbot.wait(50)
        assert clipped_once_settled(window) == []
    finally:
        window.close()


def test_review_states_are_read_once_per_case_and_version(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = data / "state" / "jobs.sqlite"
    audit = data / "state" / "audit.jsonl"
    index = ReviewIndex(data / "outbox", data, audit)
    reads: list[Path] = []
    real = schema_module.read_result
    monkeypatch.setattr(
        "gui.review_state.read_result", lambda folder: reads.append(folder) or real(folder)
    )
    queue = StoreReader(store).poll()
    assert queue is not None
    index.refresh()
    first = index.annotate(queue)
    assert len(reads) == 5  # the five cases with a result
    assert index.annotate(queue) == first and len(reads) == 5  # polling again: no reading
    assert not index.refresh()
    sign_off(data / "outbox" / "MM-2611-0415" / "v1", SignOff("accepted", "Dr C"),
             data_dir=data, audit=AuditLog(audit), write_pdf=False)  # fmt: skip
    assert index.refresh()  # the audit trail grew
    again = index.annotate(queue)
    assert reads[5:] == [data / "outbox" / "MM-2611-0415" / "v2"]  # only the case signed
    states = {c.case_key: c.review for c in again.cases}
    assert states["MM-2611-0415"].review.reviewer == "Dr C"
    assert not states["MM-2611-0415"].to_review
    with audit.open("a") as handle:  # a line being written is read once it is whole
        handle.write(json.dumps({"event": "signed_off", "case": "MM-2611-0413"})[:20])
    assert not index.refresh()


def test_a_sign_off_in_a_rotated_audit_trail_reaches_the_queue(data: Path) -> None:
    store = data / "state" / "jobs.sqlite"
    audit = data / "state" / "audit.jsonl"
    rotating = AuditLog(audit, max_bytes=1)  # every line starts a new audit.jsonl
    rotating.record("service_started")
    index = ReviewIndex(data / "outbox", data, audit)
    queue = StoreReader(store).poll()
    assert queue is not None
    index.refresh()  # read up to the end of the first line
    before = {c.case_key: c.review for c in index.annotate(queue).cases}
    assert before["MM-2611-0415"].to_review
    sign_off(data / "outbox" / "MM-2611-0415" / "v1", SignOff("accepted", "Dr D"),
             data_dir=data, audit=rotating, write_pdf=False)  # fmt: skip
    (signed,) = audit.read_text(encoding="utf-8").splitlines()  # longer than the line read
    assert '"event": "signed_off"' in signed and audit.with_name("audit-000001.jsonl").is_file()
    assert index.refresh()
    after = {c.case_key: c.review for c in index.annotate(queue).cases}
    assert after["MM-2611-0415"].review.reviewer == "Dr D"


def test_split_entries_keeps_brackets_whole() -> None:
    assert split_entries("") == [] and split_entries("  ") == []
    assert split_entries("t(11;14), del(17p); nuc ish(CCND1,IGH)x3") == [
        "t(11;14)",
        " del(17p)",
        " nuc ish(CCND1,IGH)x3",
    ]
    assert split_entries("KRAS G12D,,TP53") == ["KRAS G12D", "", "TP53"]  # for the check


def test_confirmed_findings_are_entered_in_the_dialog_and_shown_after(qtbot, data: Path) -> None:
    window = open_window(qtbot, data)
    window.select_case("MM-2611-0416")
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0416", 1), timeout=5000)
    dialog = window.ask_sign_off("sent_for_fish")
    assert dialog is not None
    dialog.name.setText(REVIEWER)
    assert dialog.ok.isEnabled() and not dialog.problem.isVisible()  # findings are optional
    qtbot.waitUntil(dialog.name.hasFocus, timeout=5000)
    qtbot.keyClick(dialog.name, Qt.Key.Key_F, Qt.KeyboardModifier.AltModifier)  # the FISH field
    assert dialog.fish.hasFocus()
    qtbot.keyClicks(dialog.fish, "t(11;14), del(17p)")
    qtbot.keyClick(dialog.fish, Qt.Key.Key_K, Qt.KeyboardModifier.AltModifier)
    assert dialog.karyotype.hasFocus()
    qtbot.keyClicks(dialog.karyotype, "46XY")
    assert not dialog.ok.isEnabled() and dialog.problem.isVisible()
    assert dialog.problem.text().startswith("Confirmed findings: karyotype 46XY does not read")
    qtbot.keyClick(dialog.karyotype, Qt.Key.Key_Return)  # Enter signs nothing while it is wrong
    assert dialog.isVisible()
    assert clipped_once_settled(dialog) == []  # the refusal drawn whole
    dialog.karyotype.setText("46,XY,t(11;14)(q13;q32)[20]")
    dialog.mutations.setText("KRAS G12D")
    assert dialog.ok.isEnabled() and not dialog.problem.isVisible()
    with qtbot.waitSignal(window.relay.signed, timeout=30_000) as signed:
        qtbot.keyClick(dialog.karyotype, Qt.Key.Key_Return)
    assert signed.args[0], signed.args[1]
    written = json.loads((Path(signed.args[2]) / "result.json").read_text())
    assert written["review"]["confirmed"] == {
        "diagnosis": "",
        "fish": ["t(11;14)", "del(17p)"],
        "karyotype": "46,XY,t(11;14)(q13;q32)[20]",
        "mutations": ["KRAS G12D"],
    }
    qtbot.waitUntil(lambda: showing(window, "MM-2611-0416", 2), timeout=5000)
    bar = window.pane.review_bar.text.text()
    assert "Confirmed: FISH t(11;14), del(17p)" in bar and "Mutations KRAS G12D" in bar
    # Signed again when the diagnosis arrives, the dialog offers what was confirmed.
    refresh(window)
    again = window.ask_sign_off("accepted")
    assert again is not None
    assert (again.fish.text(), again.mutations.text()) == ("t(11;14), del(17p)", "KRAS G12D")
    assert again.karyotype.text() == "46,XY,t(11;14)(q13;q32)[20]"
    again.diagnosis.setText("Plasma cell myeloma")
    with qtbot.waitSignal(window.relay.signed, timeout=30_000) as signed:
        again.ok.click()
    assert signed.args[0], signed.args[1]
    confirmed = read_result(Path(signed.args[2])).review.confirmed
    assert confirmed is not None and confirmed.diagnosis == "Plasma cell myeloma"
    assert confirmed.fish == ("t(11;14)", "del(17p)")
