"""Never one patient's result under another's name: distinct case ids get distinct
result folders, every reader refuses another case's result, and folders an earlier
release shared between ids are taken apart."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from appliance.results import (
    case_folder,
    latest_version,
    migrate_case_folders,
    read_result,
    unique_name,
    write_case_result,
)
from appliance.review.fhir import FhirError, export_signed_off, fhir_file
from appliance.review.relabel import label_stem
from appliance.review.sign_off import ReviewError, SignOff, sign_off
from appliance.service.audit import AuditLog, read_audit
from appliance.service.store import DONE, JobStore
from cytoedge_demo.samples import sample_content, write_sample_result
from gui.result_data import ResultUnreadableError, load_result
from gui.review_state import ReviewIndex
from gui.store_reader import queue_of
from tests import test_service_worker
from tests.test_service_worker import StandInEngine, case_state, make_config, wait_for

run_service = test_service_worker.run_service  # the fixture: a service with a stand-in engine

# Each group shared one folder under the earlier naming.
COLLIDING = [
    ["P 001", "P/001", "P_001"],
    [".001", "_001", "001"],
    ["\N{NEUTRAL FACE}", "\N{NEUTRAL FACE}\N{NEUTRAL FACE}", "..", "...", "..tif"],
    ["x" * 120, "x" * 120 + "a", "x" * 120 + "b"],
]


def test_colliding_case_ids_get_distinct_safe_folder_names() -> None:
    ids = [case_id for group in COLLIDING for case_id in group]
    names = [unique_name(case_id) for case_id in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) <= 120
    # An id that already is a safe name keeps it: the folders a person reads stay readable.
    assert unique_name("P_001") == "P_001" and unique_name("001") == "001"
    assert unique_name("P 001").startswith("P_001~")
    # Slides of one case and labelled crops follow the same rule.
    assert label_stem("P 001", "s1", 5) != label_stem("P_001", "s1", 5)
    assert label_stem("a-b", "c", 5) != label_stem("a", "b-c", 5)


def test_results_of_colliding_ids_stay_apart(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    for group in COLLIDING[:2]:
        for n, case_id in enumerate(group):
            write_sample_result(outbox, case_id, "mm_positive", (f"s{n}.svs",), write_pdf=False)
    for group in COLLIDING[:2]:
        for case_id in group:
            latest = latest_version(outbox, case_id)
            assert latest is not None and latest.version == 1
            assert read_result(latest.path).case_id == case_id
    assert len(list(outbox.iterdir())) == 6


def test_slides_whose_ids_collide_keep_their_own_folders(tmp_path: Path) -> None:
    content = sample_content("C", "mm_positive", ("s 1.svs", "s_1.svs"))
    folder, result = write_case_result(tmp_path, content, write_pdf=False)
    thumbnails = {scan.outputs.thumbnail for scan in result.scans}
    assert len(thumbnails) == 2
    assert all((folder.path / name).is_file() for name in thumbnails)


def borrowed_folder(outbox: Path, owner: str, asked: str) -> Path:
    """``asked``'s case folder holding a result of ``owner`` (a folder copied by hand,
    or one an earlier release shared between the two)."""
    written = write_sample_result(outbox, owner, "mm_positive", ("s1.svs",), write_pdf=False)
    target = case_folder(outbox, asked)
    shutil.copytree(written.case_dir, target)
    return target


def test_every_reader_refuses_another_case_s_result(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    folder = borrowed_folder(outbox, "P 001", "P_001")
    with pytest.raises(FhirError, match="not of case 'P_001'"):
        export_signed_off("P_001", outbox, tmp_path / "fhir")
    with pytest.raises(ResultUnreadableError, match="holds a result of case 'P 001'"):
        load_result(folder, "P_001")
    assert load_result(folder, "P 001").result.case_id == "P 001"  # its own name: shown
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ReviewError, match="not of case 'P_001'"):
        sign_off(
            folder / "v1", SignOff("accepted", "Dr A"), data_dir=tmp_path, audit=audit,
            write_pdf=False, case_id="P_001",
        )  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "v1"]  # nothing written
    assert not (tmp_path / "audit.jsonl").exists()


def test_fhir_files_of_colliding_ids_do_not_overwrite_each_other(tmp_path: Path) -> None:
    results = [
        sample_content(case_id, "mm_positive", ("s.svs",)).result for case_id in COLLIDING[0]
    ]
    files = {fhir_file(tmp_path, result) for result in results}
    assert len(files) == 3


def shared_folder_of_an_earlier_release(outbox: Path) -> tuple[Path, Path]:
    """``P_001/`` holding v1 of case "P 001" and v2 of case "P_001", latest at v2, as
    an earlier release wrote them; returns (v1, v2)."""
    first = write_sample_result(outbox, "P 001", "mm_positive", ("a.svs",), write_pdf=False)
    second = write_sample_result(outbox, "P_001", "mm_negative", ("b.svs",), write_pdf=False)
    shared = outbox / "P_001"
    os.rename(second.path, shared / "v2")
    os.rename(first.path, shared / "v1")
    shutil.rmtree(first.case_dir)
    (shared / "latest.json").write_text(json.dumps({"version": 2, "path": "v2"}))
    return shared / "v1", shared / "v2"


def test_a_shared_folder_of_an_earlier_release_is_taken_apart(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    v1, v2 = shared_folder_of_an_earlier_release(outbox)
    moved = migrate_case_folders(outbox)
    assert [(m.case_id, m.source) for m in moved] == [("P 001", v1)]
    own = latest_version(outbox, "P 001")
    assert own is not None and own.version == 1 and read_result(own.path).case_id == "P 001"
    kept = latest_version(outbox, "P_001")
    assert kept is not None and kept.path == v2 and read_result(v2).case_id == "P_001"
    assert not v1.exists()
    assert migrate_case_folders(outbox) == []  # once is enough


def test_the_service_moves_shared_folders_and_the_store_follows(
    run_service, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    config.ensure_dirs()
    v1, _ = shared_folder_of_an_earlier_release(config.outbox)
    store = JobStore(config.state_dir / "jobs.sqlite")
    store.record_finished_case(
        "P 001", [], state=DONE, reason="", result_version=1, result_dir=str(v1),
        bundle_hash="a" * 64, now=2.0,
    )  # fmt: skip
    store.close()
    running = run_service(StandInEngine(), config)
    moved_to = case_folder(config.outbox, "P 001") / "v1"
    wait_for(lambda: running.store.case_by_key("P 001").result_dir == str(moved_to))
    wait_for(lambda: any(r["event"] == "result_moved" for r in audit_records(config)))
    record = next(r for r in audit_records(config) if r["event"] == "result_moved")
    assert (record["case"], record["source"], record["target"]) == ("P 001", str(v1), str(moved_to))


def audit_records(config) -> list[dict]:
    return read_audit(config.state_dir / "audit.jsonl")


def test_cases_whose_ids_collide_are_scored_into_their_own_folders_by_the_service(
    run_service, tmp_path: Path
) -> None:
    running = run_service()
    for key in ("P 001", "P_001"):
        case = tmp_path / "inbox" / key
        case.mkdir()
        (case / "a.svs").write_bytes(key.encode() * 1000)
        (case / ".ready").write_bytes(b"")
    for key in ("P 001", "P_001"):
        wait_for(lambda key=key: case_state(running, key) == DONE)
    for key in ("P 001", "P_001"):
        latest = latest_version(tmp_path / "outbox", key)
        assert latest is not None and latest.version == 1
        assert read_result(latest.path).case_id == key
    # The window reviews each case from its own folder only.
    running.halt()
    store = JobStore(running.service.store_path, readonly=True)
    queue = queue_of(store.snapshot())
    store.close()
    index = ReviewIndex(tmp_path / "outbox", tmp_path / "data", tmp_path / "no-audit.jsonl")
    states = {case.case_key: index.state(case) for case in queue.cases}
    assert {key: read_result(state.folder).case_id for key, state in states.items()} == {
        "P 001": "P 001",
        "P_001": "P_001",
    }
