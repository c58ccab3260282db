"""The cell head in the window: the differential panel (each class with its colour,
count, percent and interval; the unsure cells; the plasma-cell burden and the case's
warning), the cell gallery filtered by class and the unsure cells, and re-labelling a
cell from the keyboard into the site's training folder. Offscreen here, and the same
tests again on a real X display (Xvfb, the xcb platform) by the last test."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QMessageBox

from appliance.results import GalleryCell, read_result
from appliance.service.audit import read_audit
from appliance.service.store import JobStore
from cytoedge_demo.samples import SampleCase, add_case
from gui.app import make_application
from gui.differential_view import ClassChip
from gui.main_window import MainWindow
from gui.relabel_view import RelabelDialog
from gui.result_data import TOP_CELLS, UNSURE, CaseView
from gui.store_reader import StoreReader
from tests.cell_results import CELL_CASES, write_cell_site
from tests.conftest import assert_technician_reason
from tests.gui_checks import clipped_once_settled, out_of_reach, result_parts, virtual_display

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(1280, 800), (1366, 728), (1024, 728)]
MARROW, TWO = CELL_CASES
SCORED = "MM-2611-0430"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_cell_site(tmp_path_factory.mktemp("cells"))


def open_window(qtbot, store: Path, outbox: Path, size=(1280, 800), **kwargs) -> MainWindow:
    make_application()
    window = MainWindow(store, outbox, version="9.9.9", **kwargs)
    qtbot.addWidget(window)
    window.resize(*size)
    window.show()
    window.apply_snapshot(window.reviews.annotate(StoreReader(store).poll()))
    return window


def show_case(qtbot, window: MainWindow, key: str) -> None:
    window.select_case(key)
    qtbot.waitUntil(
        lambda: window.pane.loaded is not None and window.pane.loaded.view.result.case_id == key,
        timeout=5000,
    )
    qtbot.wait(50)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under a folder with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_differential_panel_shows_each_class_the_unsure_cells_and_the_burden(
    qtbot, site
) -> None:
    window = open_window(qtbot, *site)
    show_case(qtbot, window, MARROW)
    panel = window.pane.differential
    result = window.pane.loaded.view.result
    found, burden = result.differential, result.burden
    assert panel.isVisibleTo(window) and found is not None and burden is not None
    chips = panel.findChildren(ClassChip)
    assert len(chips) == len(found.classes) == 21
    for chip, row in zip(panel.chips, found.classes, strict=True):
        assert chip.name.text() == row.label
        assert chip.figures.text() == (
            f"{row.count} · {row.percent:.1f} % ({row.low:.1f}-{row.high:.1f})"
        )
    assert panel.summary.text().startswith("348 of 389 cells classified · 41 unsure")
    # Below the minimum the burden is the case's warning, said once, on the panel.
    shown = panel.burden.text().replace("\u200b", "")
    assert shown == f"Warning: {burden.sentence()}"
    assert "outside the burden the model was validated on" in shown
    assert panel.findChildren(type(panel.burden), "case_warning") == []

    show_case(qtbot, window, TWO)
    result = window.pane.loaded.view.result
    assert [c.name.text() for c in panel.chips] == ["Plasma cell", "Other cell"]
    assert panel.burden.text().replace("\u200b", "") == result.burden.sentence()
    assert not result.burden.below and "Warning" not in panel.burden.text()


def test_the_gallery_filter_shows_one_class_or_the_unsure_cells(qtbot, site) -> None:
    window = open_window(qtbot, *site)
    show_case(qtbot, window, MARROW)
    pane = window.pane
    result = pane.loaded.view.result
    filters = [pane.gallery.filter.itemData(i).key for i in range(pane.gallery.filter.count())]
    with_crops = [r.name for r in result.differential.classes if r.count]
    assert filters == [TOP_CELLS, *with_crops, UNSURE]

    # Called by a probe on the patient embedding, a case has no top cells: no cell
    # carries attention, so the gallery offers and opens on the classes instead.
    probe = dataclasses.replace(result, top_cells=(), attention_top20_mass=None)
    no_attention = CaseView(pane.loaded.view.folder, probe).gallery_filters()
    assert [choice.key for choice in no_attention] == [*with_crops, UNSURE]

    def shown() -> list[GalleryCell]:
        items = (pane.gallery.cells.item(i) for i in range(pane.gallery.cells.count()))
        return [item.data(Qt.ItemDataRole.UserRole).cell for item in items]

    assert len(shown()) == 20 and all(c.rank for c in shown())  # the top cells, by rank
    pane.gallery.show_filter("plasma_cell")
    cells = shown()
    assert cells and all(c.cell_class == "plasma_cell" and c.sure for c in cells)
    assert [c.image.rsplit("/", 1)[0] for c in cells] == ["cells/plasma_cell"] * len(cells)
    assert [c.confidence for c in cells] == sorted((c.confidence for c in cells), reverse=True)
    assert pane.gallery.cells.item(0).text().endswith("\nPlasma cell")
    pane.gallery.show_filter(UNSURE)
    cells = shown()
    expected = [g for g in result.cell_gallery if not g.sure]
    assert cells == expected and len(cells) == 8
    assert [c.confidence for c in cells] == sorted(c.confidence for c in cells)  # least sure first
    assert all(c.image.startswith("cells/unsure/") for c in cells)
    assert pane.gallery.cells.item(0).text().endswith("?")  # the head's guess, marked unsure
    assert "unsure" in pane.gallery.hint.text()
    # Enter opens the cell with the head's call; a class crop has no rank or attention.
    opened = []
    pane.cell_opened.connect(opened.append)
    pane.gallery.cells.setCurrentRow(0)
    pane.gallery.cells.itemActivated.emit(pane.gallery.cells.item(0))
    (dialog,) = opened
    qtbot.addWidget(dialog)
    texts = [label.text() for label in dialog.findChildren(type(pane.title))]
    label = pane.loaded.view.class_labels[cells[0].cell_class]
    assert f"unsure: {label}?, confidence {cells[0].confidence:.2f}" in texts
    assert dialog.windowTitle() == f"Cell {cells[0].cell_id}"
    assert not any("attention" in t for t in texts)
    dialog.close()


def relabel_by_keyboard(qtbot, window: MainWindow, typed: str) -> RelabelDialog:
    """Select the gallery's first cell, press F2, type, press Enter."""
    pane = window.pane
    window.activateWindow()  # as a person's click would: F2 is the focused gallery's key
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)
    pane.gallery.cells.setFocus()
    pane.gallery.cells.setCurrentRow(0)
    qtbot.keyClick(pane.gallery.cells, Qt.Key.Key_F2)
    dialog = window.findChild(RelabelDialog)
    assert dialog is not None and dialog.isVisible()
    qtbot.keyClicks(dialog.typed, typed)
    qtbot.keyClick(dialog.typed, Qt.Key.Key_Return)
    return dialog


def test_relabelling_by_keyboard_saves_the_crop_and_its_sidecar_and_an_audit_line(
    qtbot, site, tmp_path: Path
) -> None:
    store, outbox = site
    training = tmp_path / "training" / "cells"
    audit_path = store.parent / "audit.jsonl"
    before = tree_digest(outbox / MARROW)
    window = open_window(qtbot, store, outbox, training_dir=training)
    show_case(qtbot, window, MARROW)
    pane = window.pane
    pane.gallery.show_filter(UNSURE)
    cell = pane.gallery.cells.item(0).data(Qt.ItemDataRole.UserRole).cell
    result = pane.loaded.view.result
    stem = f"{MARROW}-{cell.slide}-{cell.cell_id}"
    # "plasma": the only class whose name holds it; Enter saves.
    with qtbot.waitSignal(window.relay.relabelled, timeout=10_000) as outcome:
        relabel_by_keyboard(qtbot, window, "plasma")
    ok, message, key, chosen = outcome.args
    assert ok and chosen == "plasma_cell" and key == (cell.slide, cell.cell_id)
    assert f"saved as Plasma cell in {training / 'plasma_cell'}" in message
    assert "class folder cytoedge train reads" in message
    crop = training / "plasma_cell" / f"{stem}.png"
    assert crop.read_bytes() == (pane.loaded.view.folder / cell.image).read_bytes()
    sidecar = json.loads(crop.with_suffix(".json").read_text())
    assert sidecar["cell_class"] == "plasma_cell"
    assert sidecar["labelled_by"] and sidecar["labelled_at"].endswith("+00:00")
    assert (sidecar["case_id"], sidecar["result_version"]) == (MARROW, result.version)
    assert (sidecar["slide"], sidecar["cell_id"]) == (cell.slide, cell.cell_id)
    assert (sidecar["head_class"], sidecar["head_confidence"], sidecar["head_sure"]) == (
        cell.cell_class, cell.confidence, False
    )  # fmt: skip
    assert sidecar["bundle_sha256"] == result.bundle.sha256
    assert sidecar["bundle_name"] == result.bundle.name
    line = read_audit(audit_path)[-1]
    assert line["event"] == "relabelled" and line["source"] == "window"
    assert (line["case"], line["cell_id"], line["cell_class"]) == (MARROW, cell.cell_id, chosen)
    assert line["crop"] == str(crop)
    assert pane.gallery.cells.item(0).text().endswith("→ Plasma cell")
    assert pane.gallery.hint.text().replace("\u200b", "") == message  # the whole sentence

    # Again, by number: the 21st class (Other cell). One label a cell: the first one goes.
    with qtbot.waitSignal(window.relay.relabelled, timeout=10_000) as outcome:
        relabel_by_keyboard(qtbot, window, "21")
    assert outcome.args[0] and outcome.args[3] == "other_cell"
    assert sorted(p.relative_to(training).as_posix() for p in training.rglob("*.*")) == [
        f"other_cell/{stem}.json",
        f"other_cell/{stem}.png",
    ]
    assert [e["cell_class"] for e in read_audit(audit_path) if e["event"] == "relabelled"][-2:] == [
        "plasma_cell",
        "other_cell",
    ]
    # The result is never edited: no file of the case changed, no version was added.
    assert tree_digest(outbox / MARROW) == before
    assert read_result(outbox / MARROW / "v1") == result


def test_a_label_that_cannot_be_written_says_so_in_a_sentence_and_loses_nothing(
    qtbot, site, tmp_path: Path
) -> None:
    store, outbox = site
    blocker = tmp_path / "training"
    blocker.write_text("a file where the training folder should be")
    window = open_window(qtbot, store, outbox, training_dir=blocker / "cells")
    show_case(qtbot, window, TWO)
    with qtbot.waitSignal(window.relay.relabelled, timeout=10_000) as outcome:
        relabel_by_keyboard(qtbot, window, "1")
    ok, message, _, _ = outcome.args
    assert not ok and message.startswith("Could not re-label cell ")
    assert_technician_reason(message)
    box = window.findChild(QMessageBox, "relabel_problem")
    assert box is not None and box.isVisible() and box.text() == message
    box.close()
    assert blocker.read_text() == "a file where the training folder should be"
    assert "→" not in window.pane.gallery.cells.item(0).text()  # not shown as re-labelled


def test_an_audit_trail_that_cannot_be_written_stops_the_label_before_it_is_saved(
    qtbot, site, tmp_path: Path
) -> None:
    store, outbox = site
    blocker = tmp_path / "state"
    blocker.write_text("a file where the audit trail's folder should be")
    training = tmp_path / "training"
    window = open_window(qtbot, store, outbox, training_dir=training)
    window.audit_path = blocker / "audit.jsonl"
    show_case(qtbot, window, TWO)
    with qtbot.waitSignal(window.relay.relabelled, timeout=10_000) as outcome:
        relabel_by_keyboard(qtbot, window, "1")
    ok, message, _, _ = outcome.args
    assert not ok and f"the audit trail's folder {blocker} cannot be written" in message
    assert_technician_reason(message)
    window.findChild(QMessageBox, "relabel_problem").close()
    assert not training.exists()  # no label without its audit line


def test_a_cell_can_be_chosen_from_the_class_list_with_the_arrow_keys(qtbot, site) -> None:
    window = open_window(qtbot, *site)
    show_case(qtbot, window, MARROW)
    window.pane.gallery.cells.setCurrentRow(0)
    window.pane.gallery.request_relabel()
    dialog = window.findChild(RelabelDialog)
    assert dialog.chosen() is None and not dialog.ok.isEnabled()  # nothing until chosen
    qtbot.keyClicks(dialog.typed, "neutro")  # band and segmented neutrophils stay
    shown = [dialog.choices.item(r) for r in range(dialog.choices.count())]
    assert [i.text() for i in shown if not i.isHidden()] == [
        "6  Band neutrophil",
        "7  Segmented neutrophil",
    ]
    qtbot.keyClick(dialog.typed, Qt.Key.Key_Down)
    assert dialog.chosen() == "segmented_neutrophil" and dialog.ok.isEnabled()
    qtbot.keyClick(dialog.typed, Qt.Key.Key_Escape)
    assert not dialog.isVisible()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nothing_is_clipped_and_the_differential_is_within_reach(qtbot, site, size) -> None:
    window = open_window(qtbot, *site, size=size)
    for key in CELL_CASES:
        show_case(qtbot, window, key)
        assert (window.width(), window.height()) == size
        assert clipped_once_settled(window) == [], key
        panel = window.pane.differential
        parts = [*result_parts(window), panel.summary, panel.burden, *panel.chips]
        assert out_of_reach(window, parts) == [], key
        for choice in ("plasma_cell", UNSURE):
            window.pane.gallery.show_filter(choice)
            QApplication.processEvents()
            assert clipped_once_settled(window) == [], (key, choice)


@pytest.fixture(scope="module")
def scored_site(
    tiny_bundle: Path, small_scan_writer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A case the pipeline scored with a cell head (tests/cell_head_bundle.py, fitted on
    the scans' own embeddings over the tiny bundle), recorded in a store as the service
    records it."""
    import torch

    from appliance.pipeline.cases import score_case
    from appliance.pipeline.networks import SlideNetworks
    from appliance.pipeline.slides import process_slide
    from runtime.bundle_format import load_bundle
    from tests.cell_head_bundle import fitted_head, with_cell_head

    work = tmp_path_factory.mktemp("scored")
    scans = [small_scan_writer(work / "s3.tif", seed=3, size=1024)]

    def processed(bundle_path: Path, cache: str) -> list:
        with SlideNetworks(load_bundle(bundle_path)) as networks:
            return [process_slide(scan, networks, cache_dir=work / cache) for scan in scans]

    reference = np.concatenate([s.cells().embeddings for s in processed(tiny_bundle, "a")])
    # The operating point at the head's median confidence: about half the cells unsure.
    head = fitted_head(reference)
    with torch.no_grad():
        logits = head(torch.from_numpy(reference.astype(np.float32)))
    confidence = torch.softmax(logits, 1).max(1).values.numpy()
    point = float(np.median(confidence))
    bundle = with_cell_head(tiny_bundle, work / "bundle", reference, operating_point=point)
    slides = processed(work / "bundle", "b")
    outbox, store_path = work / "outbox", work / "state" / "jobs.sqlite"
    case = score_case(SCORED, slides, bundle, outbox, write_pdf=False)
    store = JobStore(store_path)
    try:
        names = tuple(scan.name for scan in scans)
        sample = SampleCase(SCORED, "done", 1, names, kind="mm_positive")
        add_case(store, sample, now=time.time(), result=case.folder)
    finally:
        store.close()
    return store_path, outbox


@pytest.mark.slow
def test_a_case_the_pipeline_scored_shows_its_differential_and_a_cell_is_relabelled(
    qtbot, scored_site, tmp_path: Path
) -> None:
    store, outbox = scored_site
    training = tmp_path / "training"
    window = open_window(qtbot, store, outbox, training_dir=training)
    show_case(qtbot, window, SCORED)
    pane = window.pane
    result = pane.loaded.view.result
    found = result.differential
    assert found is not None and found.unsure > 0  # cells near the head's split
    assert [c.name.text() for c in pane.differential.chips] == ["Plasma cell", "Other cell"]
    assert (
        pane.differential.burden.text()
        .replace("\u200b", "")
        .startswith(result.burden.sentence()[:20])
    )
    assert clipped_once_settled(window) == []
    pane.gallery.show_filter(UNSURE)
    first = pane.gallery.cells.item(0).data(Qt.ItemDataRole.UserRole).cell
    assert first == next(g for g in result.cell_gallery if not g.sure)
    with qtbot.waitSignal(window.relay.relabelled, timeout=10_000) as outcome:
        relabel_by_keyboard(qtbot, window, "other")
    assert outcome.args[0] and outcome.args[3] == "other_cell"
    crop = training / "other_cell" / f"{SCORED}-{first.slide}-{first.cell_id}.png"
    assert crop.read_bytes() == (pane.loaded.view.folder / first.image).read_bytes()
    assert json.loads(crop.with_suffix(".json").read_text())["head_sure"] is False


def test_the_window_draws_on_the_platform_asked_for(qtbot) -> None:
    make_application()
    assert QApplication.platformName() == os.environ["QT_QPA_PLATFORM"]


@pytest.mark.slow
def test_the_cell_views_work_on_a_real_x_display(tmp_path: Path) -> None:
    """Every test above again, in a fresh interpreter whose Qt draws on an X server."""
    with virtual_display("1920x1080") as display:
        env = {
            **os.environ,
            "DISPLAY": display,
            "QT_QPA_PLATFORM": "xcb",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "demo")]),
        }
        env.pop("WAYLAND_DISPLAY", None)
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
             "-k", "not real_x_display", "--basetemp", str(tmp_path / "run")],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.splitlines()[-1]
    ran = re.search(r"(\d+) passed", summary)
    assert ran is not None and int(ran.group(1)) >= 9, summary  # the scored case may skip
