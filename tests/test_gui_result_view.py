"""The result pane over result folders written by the appliance's result writer."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt, QThreadPool
from PySide6.QtGui import QColor, QImage
from PySide6.QtWidgets import QGridLayout, QLabel

from appliance.results import SignerRecord, read_result
from cytoedge_demo.samples import KINDS, write_sample_result
from gui.result_data import DEMO_BANNER, ResultUnreadableError, load_result
from gui.result_view import CellDialog, ProbabilityBar, ResultPane, read_folder
from runtime.bundle_signer import NOT_TRUSTED


def text_of_grid(grid: QGridLayout) -> list[str]:
    """What the grid shows, in order: labels' texts and the bars' accessible names."""
    texts = []
    for index in range(grid.count()):
        item = grid.itemAt(index)
        widget = item.widget() if item is not None else None
        if isinstance(widget, QLabel):
            texts.append(widget.text())
        elif isinstance(widget, ProbabilityBar):
            texts.append(widget.accessibleName())
    return texts


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outbox = tmp_path_factory.mktemp("outbox")
    return {
        kind: write_sample_result(outbox, f"case-{kind}", kind, ("s1.svs", "s2.svs"), seed=n).path
        for n, kind in enumerate(KINDS)
    }


def banner_texts(pane: ResultPane) -> list[str]:
    """The banners' words, top to bottom."""
    items = (pane.banner_box.itemAt(i) for i in range(pane.banner_box.count()))
    return [item.widget().text() for item in items if isinstance(item.widget(), QLabel)]


def shown(qtbot, folder: Path) -> ResultPane:
    pane = ResultPane()
    qtbot.addWidget(pane)
    pane.resize(800, 700)
    pane.show_result(read_folder(folder))
    return pane


def test_positive_mm_case_shows_bars_thresholds_calls_and_high_risk(qtbot, folders) -> None:
    pane = shown(qtbot, folders["mm_positive"])
    texts = text_of_grid(pane.predictions_grid)
    assert "del(17p)" in texts
    assert "del(17p): probability 0.81, threshold 0.42, positive" in texts
    assert "POSITIVE" in texts  # the del(17p) call, and the high-risk call
    # The high-risk row says the bundle's own rule: its high_risk tasks, by label.
    assert "<b>High risk (del(17p) or t(4;14))</b>" in texts
    assert texts[-1] == "POSITIVE"
    assert "cells analysed from 2 slides" in pane.summary.text()
    assert "QC passed" in pane.qc_line.text()
    assert banner_texts(pane) == [DEMO_BANNER]


def test_negative_case_calls_everything_negative(qtbot, folders) -> None:
    pane = shown(qtbot, folders["mm_negative"])
    texts = text_of_grid(pane.predictions_grid)
    calls = [t for t in texts if t.lower() in ("positive", "negative", "indeterminate")]
    assert calls == ["negative"] * 5  # four tasks and the high-risk call


def test_abstained_case_has_a_banner_and_no_calls(qtbot, folders) -> None:
    pane = shown(qtbot, folders["abstained"])
    banners = banner_texts(pane)
    assert banners[0].startswith("No call: too few cells")
    assert DEMO_BANNER in banners
    texts = text_of_grid(pane.predictions_grid)
    assert texts == ["No call was made: too few cells: 9 (the bundle needs at least 50)."]


def test_qc_failed_case_shows_the_reasons_and_opens_on_the_qc_tab(qtbot, folders) -> None:
    pane = shown(qtbot, folders["qc_failed"])
    assert banner_texts(pane)[0] == "Rejected: slide QC failed: 71 % of tiles blurred"
    assert "QC failed" in pane.qc_line.text() and "71 % of tiles blurred" in pane.qc_line.text()
    assert pane.tabs.tabText(pane.tabs.currentIndex()) == "&Slides and QC"
    assert not pane.slide_picture.pixmap().isNull()  # the scan itself, to see the blur
    assert pane.slides_table.rowCount() == 2
    assert pane.slides_table.item(0, 1).text() == "fail"
    assert "71 % of tiles blurred" in pane.slides_table.item(0, 3).text()
    assert pane.gallery.cells.count() == 0


def test_demo_banner_only_for_demo_bundles(qtbot, folders) -> None:
    assert DEMO_BANNER in banner_texts(shown(qtbot, folders["mm_positive"]))
    research = shown(qtbot, folders["research"])
    assert banner_texts(research) == []
    banner_labels = research.findChildren(object, "banner_demo")
    assert banner_labels == []


def with_bundle(folder: Path, into: Path, **signed: object) -> Path:
    """A copy of a result folder whose result names the bundle's signature otherwise."""
    copy = Path(shutil.copytree(folder, into))
    result = read_result(copy)
    bundle = dataclasses.replace(result.bundle, **signed)
    changed = dataclasses.replace(result, bundle=bundle).to_json()
    (copy / "result.json").write_text(json.dumps(changed), encoding="utf-8")
    return copy


def test_the_case_header_names_the_bundles_signer_or_warns(qtbot, folders, tmp_path) -> None:
    owner = SignerRecord("owner", "ab" * 32)
    signed = shown(qtbot, with_bundle(folders["research"], tmp_path / "signed", signer=owner))
    assert f"bundle signed by owner ({'ab' * 8})" in signed.summary.text()
    assert banner_texts(signed) == []
    warned = with_bundle(folders["research"], tmp_path / "warned", signature_warning=NOT_TRUSTED)
    pane = shown(qtbot, warned)
    assert banner_texts(pane) == ["Bundle not signed by a trusted key"]
    assert "signed by" not in pane.summary.text()


def test_pb_case_shows_malignancy_and_top_two_classes(qtbot, folders) -> None:
    pane = shown(qtbot, folders["pb"])
    texts = text_of_grid(pane.predictions_grid)
    assert "malignancy: probability 0.86, threshold 0.50, positive" in texts
    assert "<b>Most likely</b>: acute leukemia 0.46, MDS 0.21" in texts
    assert "<b>Hemoglobin (regression)</b>: 11.2 g/dL" in texts
    assert not any("High risk" in t for t in texts)


def test_the_bar_marks_the_threshold_where_it_is(qtbot) -> None:
    bar = ProbabilityBar(0.8, 0.25, "positive", "t")
    qtbot.addWidget(bar)
    bar.resize(402, 30)
    image = bar.grab().toImage().convertToFormat(QImage.Format.Format_RGB32)
    # The tick above the track is drawn only at the threshold.
    black = [x for x in range(image.width()) if QColor(image.pixel(x, 1)).lightness() < 60]
    assert black and abs(sum(black) / len(black) - 1 - 400 * 0.25) <= 2
    filled = QColor(image.pixel(300, 15))  # inside 0.8 of the track: the positive colour
    assert filled.red() > 150 and filled.green() < 60
    empty = QColor(image.pixel(380, 15))  # beyond 0.8: the grey track
    assert empty.lightness() > 200


def test_the_gallery_lists_the_top_cells_and_opens_one_with_its_measurements(
    qtbot, folders
) -> None:
    pane = shown(qtbot, folders["mm_positive"])
    assert pane.gallery.cells.count() == 20
    first = pane.gallery.cells.item(0)
    cell = first.data(Qt.ItemDataRole.UserRole).cell
    assert cell.rank == 1
    assert cell == read_result(folders["mm_positive"]).top_cells[0]
    opened: list[CellDialog] = []
    pane.cell_opened.connect(opened.append)
    pane.gallery.cells.itemClicked.emit(first)
    assert len(opened) == 1
    dialog = opened[0]
    qtbot.addWidget(dialog)
    assert dialog.measurements["cell_id"] == str(cell.cell_id)
    assert float(dialog.measurements["area_um2"]) > 0
    labels = [w.text() for w in dialog.findChildren(type(pane.title))]
    assert any("% of the case's attention" in t for t in labels)
    dialog.close()


def test_the_heatmap_of_the_chosen_slide_is_shown(qtbot, folders) -> None:
    pane = shown(qtbot, folders["mm_positive"])
    assert pane.slide_choice.count() == 2
    pane.select_slide("s2.svs")
    assert pane.slide_choice.currentData() == "s2"
    assert pane.heatmap.pixmap() is not None and not pane.heatmap.pixmap().isNull()
    pane.heat_only_slide.setChecked(True)
    assert not pane.heatmap.pixmap().isNull()


def test_loading_happens_off_the_ui_thread_and_arrives_as_a_signal(qtbot, folders) -> None:
    pane = ResultPane()
    qtbot.addWidget(pane)
    with qtbot.waitSignal(pane.loader.loaded, timeout=5000):
        pane.load(folders["pb"].parent)  # the case folder: latest.json is followed
    assert pane.loaded is not None and pane.loaded.view.result.case_id == "case-pb"


def test_a_folder_read_before_a_newer_request_is_never_shown(qtbot, folders) -> None:
    """Selecting case A then B quickly: A's read may finish before B is asked for, its
    delivery still queued for the UI thread; the pane must show B, never A after B."""
    pane = ResultPane()
    qtbot.addWidget(pane)
    shown: list[str] = []
    pane.loader.loaded.connect(lambda loaded: shown.append(loaded.view.result.case_id))
    pane.load(folders["pb"])
    assert QThreadPool.globalInstance().waitForDone(5000)  # A read; its delivery queued
    with qtbot.waitSignal(pane.loader.loaded, timeout=5000):
        pane.load(folders["mm_negative"])
    qtbot.wait(50)
    assert shown == ["case-mm_negative"]


def test_an_unreadable_folder_says_why(qtbot, tmp_path: Path) -> None:
    with pytest.raises(ResultUnreadableError, match="no result"):
        load_result(tmp_path)
    pane = ResultPane()
    qtbot.addWidget(pane)
    with qtbot.waitSignal(pane.loader.failed, timeout=5000):
        pane.load(tmp_path)
    assert pane._message_title.text() == "Result not readable"
