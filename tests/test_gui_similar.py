"""The result pane's similar earlier cases: listed with what was confirmed, one
keystroke (Alt+1 ... Alt+5) to open each."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt

from appliance.results import write_case_result
from appliance.results.schema import PatientEmbeddingRecord, SimilarCase
from cytoedge_demo.samples import sample_content, write_sample_result
from gui.result_view import ResultPane, read_folder

SIMILAR = (
    SimilarCase("earlier-2", 1, 0.91, "sent_for_fish", fish=("t(4;14)",)),
    SimilarCase("earlier-1", 1, 0.74, "accepted", diagnosis="multiple myeloma"),
)


def write_case(outbox: Path) -> Path:
    content = sample_content("now", "mm_positive", ("s1.svs",), seed=4)
    record = PatientEmbeddingRecord("genbloom-v", "cls", 384, "ab" * 32, 120)
    content.result = dataclasses.replace(
        content.result, patient_embedding=record, similar_cases=SIMILAR
    )
    folder, _ = write_case_result(outbox, content, write_pdf=False)
    return folder.path


def test_similar_cases_are_listed_and_one_keystroke_opens_each(qtbot, tmp_path: Path) -> None:
    outbox = tmp_path / "out"
    for seed, case in enumerate(("earlier-1", "earlier-2")):
        write_sample_result(outbox, case, "mm_negative", seed=seed)
    pane = ResultPane()
    qtbot.addWidget(pane)
    pane.resize(900, 700)
    pane.show()
    pane.show_result(read_folder(write_case(outbox)))
    table = pane.similar.table
    rows = [[table.item(r, c).text() for c in range(table.columnCount())] for r in range(2)]
    assert rows == [
        ["Alt+1", "earlier-2", "0.91", "Sent for FISH", "FISH: t(4;14)"],
        ["Alt+2", "earlier-1", "0.74", "Accepted", "multiple myeloma"],
    ]
    pane.activateWindow()
    qtbot.waitUntil(pane.isActiveWindow, timeout=5000)
    assert pane.tabs.currentWidget() is not pane.similar  # the keys work from any tab
    with qtbot.waitSignal(pane.loader.loaded, timeout=10000):
        qtbot.keyClick(pane, Qt.Key.Key_2, Qt.KeyboardModifier.AltModifier)
    assert pane.loaded is not None and pane.loaded.view.result.case_id == "earlier-1"


def test_a_result_without_a_patient_embedding_says_why_none_are_listed(
    qtbot, tmp_path: Path
) -> None:
    pane = ResultPane()
    qtbot.addWidget(pane)
    pane.show_result(read_folder(write_sample_result(tmp_path, "plain", "mm_negative").path))
    assert pane.similar.table.rowCount() == 0
    assert "no patient encoder" in pane.similar.note.text()


def test_long_confirmed_findings_wrap_instead_of_being_cut(qtbot, tmp_path: Path) -> None:
    from gui.app import make_application

    make_application()  # the window's style and font
    long = SimilarCase(
        "earlier-3",
        1,
        0.88,
        "accepted",
        diagnosis="multiple myeloma (synthetic)",
        fish=("del(17p)", "t(4;14)", "t(11;14)", "gain(1q)"),
        karyotype="46,XY,t(11;14)(q13;q32)[20]",
    )
    content = sample_content("long", "mm_positive", ("s1.svs",), seed=5)
    record = PatientEmbeddingRecord("genbloom-v", "cls", 384, "ab" * 32, 120)
    content.result = dataclasses.replace(
        content.result, patient_embedding=record, similar_cases=(long,)
    )
    folder, _ = write_case_result(tmp_path / "out", content, write_pdf=False)
    pane = ResultPane()
    qtbot.addWidget(pane)
    pane.resize(700, 700)
    pane.show()
    pane.show_result(read_folder(folder.path))
    pane.tabs.setCurrentWidget(pane.similar)
    table = pane.similar.table
    assert table.item(0, 4).text() == long.confirmed()
    # The text needs more lines than a default row holds; the row grows to what the
    # table's own delegate measures for it.
    assert table.sizeHintForRow(0) > 2 * table.fontMetrics().lineSpacing() + 8
    qtbot.waitUntil(lambda: table.rowHeight(0) >= table.sizeHintForRow(0), timeout=3000)
