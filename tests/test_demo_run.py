"""``cytoedge demo`` on the tiny bundle, run once for the module (it takes a minute).

Its cases are in the job store, so the window lists them the first time it opens, as
the scored, abstained and rejected cases they are. It signs off earlier synthetic cases
before it scores the demo patient, so the patient's result and the window list similar
earlier cases with their confirmed markers; running the demo again adds no earlier case
to the case index. The tests run in file order: the last one runs the demo again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from appliance.config import Config, load_config
from appliance.pipeline.patients import patient_encoder_sha256
from appliance.results import latest_version, read_result
from appliance.results.case_index import CaseIndex
from appliance.service.store import DONE, REJECTED, store_path
from cytoedge_demo.earlier_cases import CASE_PREFIX, CASES, DIAGNOSIS, REVIEWER, earlier_labels
from runtime.bundle_format import load_bundle
from runtime.labels import MYELOMA_MARKERS

PATIENT = "demo-patient-001"


def test_earlier_cases_carry_each_marker_on_half_of_them() -> None:
    labels = earlier_labels(CASES)
    for marker in MYELOMA_MARKERS:
        assert sum(case[marker] for case in labels) == (CASES + 1) // 2, marker
    assert len({tuple(case.values()) for case in labels}) > 2  # markers drawn apart


@pytest.fixture(scope="module")
def demo_run(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The configuration of a data folder the demo has run in once."""
    from cytoedge_demo.builder import run_demo

    root = tmp_path_factory.mktemp("demo-run")
    (root / "data").mkdir()
    config_file = root / "cytoedge.toml"
    config_file.write_text(
        f'[paths]\ndata_dir = "{root / "data"}"\nbundle = "{tiny_bundle}"\n'
        '[runtime]\nbackend = "ort-cpu"\n'
    )
    config = load_config(config_file)
    config.ensure_dirs()
    assert run_demo(config) == 0  # the demo bundle is the tiny one: nothing is built
    return config


def open_window(qtbot, config: Config):
    """The technician's window on the demo's data folder, its first snapshot applied."""
    pytest.importorskip("PySide6")
    from gui.app import make_application
    from gui.main_window import MainWindow
    from gui.store_reader import StoreReader

    make_application()
    store = store_path(config.state_dir)
    window = MainWindow(store, config.outbox, data_dir=config.data_dir)
    qtbot.addWidget(window)
    window.resize(1280, 800)
    window.show()
    snapshot = StoreReader(store).poll()
    assert snapshot is not None  # before: "no job store ... (has the service run yet?)"
    window.apply_snapshot(window.reviews.annotate(snapshot))
    return window


def select(qtbot, window, case_id: str) -> None:
    window.select_case(case_id)
    qtbot.waitUntil(
        lambda: (
            window.pane.loaded is not None and window.pane.loaded.view.result.case_id == case_id
        ),
        timeout=10_000,
    )


@pytest.mark.slow
def test_the_window_shows_the_demo_s_cases_the_first_time_it_opens(qtbot, demo_run: Config) -> None:
    window = open_window(qtbot, demo_run)
    cases = {case.case_key: case for case in window.model.cases()}
    assert set(cases) == {"demo-patient-001", "demo-blood-001", "demo-blurred"}
    assert [s.name for s in cases["demo-patient-001"].slides] == [
        "smear-1.tif",
        "smear-2.tif",
        "smear-3.tif",
    ]
    for key, case in cases.items():
        result = read_result(Path(case.result_dir))
        no_call = result.status == "rejected" or not result.predictions
        assert case.state == (REJECTED if no_call else DONE), key
        assert case.reason == (result.abstain_reason or ""), key
        assert case.review is not None and case.review.to_review  # the demo bundle: unverified
        select(qtbot, window, key)
        assert window.pane.loaded.view.result.version == case.result_version == 1
        assert window.buttons["report"].isEnabled()
    blurred = cases["demo-blurred"]
    assert blurred.state == REJECTED and "slide QC failed" in blurred.reason
    assert blurred.slides[0].state == REJECTED and blurred.slides[0].reason.startswith(
        "slide QC failed"
    )
    assert cases["demo-blood-001"].state == DONE


def index_rows(config: Config) -> Counter[str]:
    """Rows per case in the case index of the demo bundle's patient encoder."""
    bundle = load_bundle(config.bundle_dir)
    assert bundle.patient_encoder is not None
    index = CaseIndex.open(
        config.data_dir,
        config.outbox,
        patient_encoder_sha256(bundle),
        bundle.patient_encoder.embed_dim,
    )
    return Counter(row.case_id for row in index.rows)


@pytest.mark.slow
def test_the_demo_patient_lists_earlier_cases_with_their_confirmed_markers(
    qtbot, demo_run: Config
) -> None:
    from cytoedge_demo.builder import run_demo

    config = demo_run
    markers = {
        f"{CASE_PREFIX}{i + 1:02d}": tuple(m for m in MYELOMA_MARKERS if labels[m])
        for i, labels in enumerate(earlier_labels(CASES))
    }
    for case_id, found in markers.items():
        earlier = read_result(latest_version(config.outbox, case_id).path)
        assert earlier.review is not None and earlier.review.reviewer == REVIEWER
        assert earlier.review.decision == "accepted"
        assert earlier.review.confirmed is not None
        assert earlier.review.confirmed.fish == found
        assert earlier.review.confirmed.diagnosis == DIAGNOSIS

    patient = read_result(latest_version(config.outbox, PATIENT).path)
    similar = patient.similar_cases
    assert len(similar) == 5  # the index's k, of the ten signed off
    assert [s.similarity for s in similar] == sorted((s.similarity for s in similar), reverse=True)
    for case in similar:
        assert case.case_id in markers
        assert case.fish == markers[case.case_id] and case.diagnosis == DIAGNOSIS
    assert any(case.fish for case in similar)

    rows = index_rows(config)
    earlier_rows = {case: count for case, count in rows.items() if case in markers}
    assert earlier_rows == dict.fromkeys(markers, 2)  # scored, then signed off
    versions = {case: latest_version(config.outbox, case).version for case in markers}

    assert run_demo(config) == 0  # again: the earlier cases are kept as they are
    rows_again = index_rows(config)
    assert {case: rows_again[case] for case in markers} == earlier_rows
    assert {case: latest_version(config.outbox, case).version for case in markers} == versions
    again = read_result(latest_version(config.outbox, PATIENT).path)
    assert again.version == 2
    assert [s.case_id for s in again.similar_cases] == [s.case_id for s in similar]

    show_in_window(qtbot, config, again.similar_cases)


def show_in_window(qtbot, config: Config, similar: tuple) -> None:
    """The window's Similar tab for the demo patient lists the cases with their markers,
    nothing cut off."""
    from tests.gui_checks import clipped_once_settled

    window = open_window(qtbot, config)
    select(qtbot, window, PATIENT)
    pane = window.pane
    pane.tabs.setCurrentWidget(pane.similar)
    table = pane.similar.table
    shown = [[table.item(r, c).text() for c in (1, 4)] for r in range(table.rowCount())]
    assert shown == [[case.case_id, case.confirmed()] for case in similar]
    assert all(DIAGNOSIS in confirmed for _, confirmed in shown)
    for row in range(table.rowCount()):  # wrapped to their full height, never elided
        assert table.rowHeight(row) >= table.sizeHintForRow(row), shown[row]
    assert clipped_once_settled(window) == []
