"""What in the inbox is a scan, its case, and when it is complete (no pipeline)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.readers import scan_fingerprint
from appliance.service import inbox_layout
from appliance.service.inbox_layout import (
    Signature,
    StabilityTracker,
    compile_case_pattern,
    discover,
    signature,
)


def write(path: Path, data: bytes = b"scan-bytes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def by_path(inbox: Path, pattern: str = "") -> dict[str, inbox_layout.Unit]:
    found = discover(inbox, compile_case_pattern(pattern))
    return {str(u.path.relative_to(inbox)): u for u in found.units}


def test_subfolders_are_cases_and_loose_files_are_cases_of_one(tmp_path: Path) -> None:
    write(tmp_path / "P-001" / "a.svs")
    write(tmp_path / "P-001" / "b.ndpi")
    write(tmp_path / "loose.tiff")
    found = by_path(tmp_path)
    assert set(found) == {"P-001/a.svs", "P-001/b.ndpi", "loose.tiff"}
    assert {found["P-001/a.svs"].case_key, found["P-001/b.ndpi"].case_key} == {"P-001"}
    assert not found["P-001/a.svs"].single
    assert (found["loose.tiff"].case_key, found["loose.tiff"].single) == ("loose", True)


def test_a_case_pattern_groups_loose_files(tmp_path: Path) -> None:
    for name in ("AB-12_1.svs", "AB-12_2.svs", "CD-9_1.svs", "other.svs"):
        write(tmp_path / name)
    write(tmp_path / "AB-12.ready", b"")
    found = by_path(tmp_path, r"(?P<case>[A-Z0-9-]+)_\d+\.svs")
    assert found["AB-12_1.svs"].case_key == found["AB-12_2.svs"].case_key == "AB-12"
    assert not found["AB-12_1.svs"].single
    assert found["CD-9_1.svs"].case_key == "CD-9"
    assert (found["other.svs"].case_key, found["other.svs"].single) == ("other", True)
    ready = discover(tmp_path, compile_case_pattern(r"(?P<case>[A-Z0-9-]+)_\d+\.svs"))
    assert ready.ready_cases == {"AB-12"}


def test_a_case_pattern_without_the_case_group_is_refused() -> None:
    with pytest.raises(ValueError, match="named group"):
        compile_case_pattern(r"([A-Z]+)_\d+")
    with pytest.raises(ValueError, match="not a valid regex"):
        compile_case_pattern(r"(?P<case>[A-Z")


def test_ready_file_marks_a_case_folder_complete(tmp_path: Path) -> None:
    write(tmp_path / "P1" / "a.svs")
    write(tmp_path / "P2" / "a.svs")
    write(tmp_path / "P2" / ".ready", b"")
    assert discover(tmp_path).ready_cases == {"P2"}


@pytest.mark.parametrize(
    "name", ["scan.svs.part", "scan.tmp", "~$scan.svs", ".hidden.svs", "scan.svs.crdownload"]
)
def test_temporary_and_hidden_names_are_ignored_until_renamed(tmp_path: Path, name: str) -> None:
    write(tmp_path / name)
    write(tmp_path / "P" / name)
    assert by_path(tmp_path) == {}
    (tmp_path / name).rename(tmp_path / "scan.svs")
    assert set(by_path(tmp_path)) == {"scan.svs"}


def test_mrxs_with_its_folder_is_one_unit_and_its_data_counts(tmp_path: Path) -> None:
    write(tmp_path / "slide.mrxs", b"index")
    write(tmp_path / "slide" / "Slidedat.ini", b"ini")
    write(tmp_path / "slide" / "Data0000.dat", b"data")
    found = by_path(tmp_path)
    assert set(found) == {"slide.mrxs"}
    unit = found["slide.mrxs"]
    assert unit.kind == "mrxs"
    sig = signature(unit)
    assert sig is not None and (sig.files, sig.size) == (3, len(b"index" + b"ini" + b"data"))


def test_dicom_and_single_cell_folders_are_single_units(tmp_path: Path) -> None:
    write(tmp_path / "dicom-slide" / "level0.dcm")
    write(tmp_path / "dicom-slide" / "level1.dcm")
    cells = tmp_path / "patient-7"
    cells.mkdir()
    for i in range(3):
        Image.fromarray(np.full((144, 144, 3), 200, np.uint8)).save(cells / f"c{i}.png")
    found = by_path(tmp_path)
    assert set(found) == {"dicom-slide/level0.dcm", "patient-7"}
    dicom = found["dicom-slide/level0.dcm"]
    assert (dicom.kind, dicom.case_key, dicom.single) == ("dicom", "dicom-slide", True)
    sig = signature(dicom)
    assert sig is not None and sig.files == 2
    assert (found["patient-7"].kind, found["patient-7"].case_key) == ("cells", "patient-7")


def test_a_folder_of_large_images_is_a_field_folder_and_beside_a_scan_a_slide(
    tmp_path: Path,
) -> None:
    case = tmp_path / "P"
    case.mkdir()
    Image.fromarray(np.full((900, 900, 3), 200, np.uint8)).save(case / "field.png")
    write(case / "field.png.json", b'{"pixel_size_um": 0.25}')
    found = by_path(tmp_path)
    assert set(found) == {"P"}
    assert (found["P"].kind, found["P"].case_key, found["P"].single) == ("fields", "P", True)
    assert found["P"].case_dir == case, "at the top of the inbox the folder is its own case"
    assert case / "field.png.json" in found["P"].members.files(), "sidecars are members"
    # Inside a case folder the smear's photos are one slide of the case.
    smear = tmp_path / "Q" / "smear-1"
    smear.mkdir(parents=True)
    Image.fromarray(np.full((900, 900, 3), 200, np.uint8)).save(smear / "f1.png")
    write(tmp_path / "Q" / "bone-marrow.svs")
    found = by_path(tmp_path)
    assert (found["Q/smear-1"].kind, found["Q/smear-1"].case_key) == ("fields", "Q")
    assert not found["Q/smear-1"].single and found["Q/bone-marrow.svs"].kind == "file"
    assert found["Q/smear-1"].case_dir == tmp_path / "Q", "the case's .ready lies beside it"
    # Beside a slide scan, a photo is one slide of the case.
    write(case / "other.svs")
    found = by_path(tmp_path)
    assert {"P/field.png", "P/other.svs"} <= set(found)
    assert found["P/field.png"].extras == (case / "field.png.json",)


def test_symlinks_out_of_the_inbox_are_not_followed(tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    write(outside / "secret.svs")
    write(outside / "case" / "a.svs")
    inbox.mkdir()
    os.symlink(outside / "secret.svs", inbox / "link.svs")
    os.symlink(outside / "case", inbox / "linked-case")
    write(inbox / "real.svs")
    os.symlink(inbox / "real.svs", inbox / "inside-link.svs")
    assert set(by_path(inbox)) == {"real.svs", "inside-link.svs"}


def test_unsupported_extensions_are_units_that_say_why(tmp_path: Path) -> None:
    write(tmp_path / "notes.docx")
    write(tmp_path / "sidecar-only.png.json")
    unit = by_path(tmp_path)["notes.docx"]
    assert not unit.supported
    assert "unsupported file type .docx" in unit.unsupported_reason


def test_fingerprint_is_content_only_so_copies_and_renames_match(tmp_path: Path) -> None:
    write(tmp_path / "a.svs", b"x" * 10_000)
    write(tmp_path / "renamed.svs", b"x" * 10_000)
    write(tmp_path / "other.svs", b"y" * 10_000)
    write(tmp_path / "m1.mrxs", b"idx")
    write(tmp_path / "m1" / "Data0000.dat", b"d")
    write(tmp_path / "m2.mrxs", b"idx")
    write(tmp_path / "m2" / "Data0000.dat", b"d")
    found = by_path(tmp_path)
    fp = {k: u.members.fingerprint() for k, u in found.items()}
    assert fp["a.svs"] == fp["renamed.svs"] != fp["other.svs"]
    assert fp["m1.mrxs"] == fp["m2.mrxs"]
    import hashlib

    assert fp["a.svs"] == hashlib.sha256(b"x" * 10_000).hexdigest()


def test_a_scan_handed_over_directly_has_the_watchers_fingerprint(tmp_path: Path) -> None:
    """`cytoedge score PATH` and the service share slide-cache entries: same members,
    same fingerprint (a sidecar's pixel size or an MRXS data file is part of the scan)."""
    write(tmp_path / "field.png", b"png")
    write(tmp_path / "field.png.json", b'{"pixel_size_um": 0.25}')
    write(tmp_path / "m1.mrxs", b"idx")
    write(tmp_path / "m1" / "Data0000.dat", b"d")
    for name in ("0001.dcm", "0002.dcm"):
        write(tmp_path / "wsi" / name, name.encode())
    cells = tmp_path / "P0001"
    cells.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(cells / "cell_0000.png")
    (cells / ".ready").touch()
    found = by_path(tmp_path)
    watched = {k: u.members.fingerprint() for k, u in found.items()}
    assert watched["field.png"] == scan_fingerprint(tmp_path / "field.png")
    assert watched["m1.mrxs"] == scan_fingerprint(tmp_path / "m1.mrxs")
    assert watched["P0001"] == scan_fingerprint(cells)
    dicom = watched["wsi/0001.dcm"]
    assert dicom == scan_fingerprint(tmp_path / "wsi")
    assert dicom == scan_fingerprint(tmp_path / "wsi" / "0002.dcm")
    # The sidecar and the data file count: change one and the scan is another.
    plain_png = scan_fingerprint(tmp_path / "field.png")
    write(tmp_path / "field.png.json", b'{"pixel_size_um": 0.5}')
    assert scan_fingerprint(tmp_path / "field.png") != plain_png
    write(tmp_path / "m1" / "Data0000.dat", b"e")
    assert scan_fingerprint(tmp_path / "m1.mrxs") != watched["m1.mrxs"]


def test_stability_needs_the_same_signature_for_the_whole_quiet_period() -> None:
    tracker = StabilityTracker()
    path = Path("/in/a.svs")
    growing = [Signature(1, n, n) for n in (10, 20, 30)]
    for t, sig in enumerate(growing):
        assert tracker.observe(path, sig, float(t)) == 0.0  # still changing
    assert tracker.observe(path, growing[-1], 3.9) == pytest.approx(1.9)
    assert tracker.observe(path, growing[-1], 4.0) == pytest.approx(2.0)
    # A touch (new mtime, same size) restarts the wait.
    assert tracker.observe(path, Signature(1, 30, 99), 4.5) == 0.0
    assert tracker.observe(path, Signature(1, 30, 99), 6.5) == pytest.approx(2.0)


def test_signature_follows_size_and_mtime_and_none_when_gone(tmp_path: Path) -> None:
    path = write(tmp_path / "a.svs", b"1234")
    unit = by_path(tmp_path)["a.svs"]
    first = signature(unit)
    with open(path, "ab") as handle:
        handle.write(b"56")
    second = signature(unit)
    assert first is not None and second is not None and second.size == first.size + 2
    path.unlink()
    assert signature(unit) is None


def test_a_folder_that_changes_shape_while_written_leaves_no_stray_rows(tmp_path: Path) -> None:
    from appliance.service.audit import AuditLog
    from appliance.service.store import JobStore
    from appliance.service.watcher import InboxWatcher, WatchSettings

    inbox = tmp_path / "inbox"
    folder = inbox / "P1"
    write(folder / "cell_0000.tif", b"II*\0")  # a crop whose header is not written yet
    settings = WatchSettings(inbox, 60.0, 0.0, False, None, lambda: "b" * 64)
    store_file = tmp_path / "jobs.sqlite"
    watcher = InboxWatcher(
        settings, store_file, lambda p: None, AuditLog(tmp_path / "a.jsonl"), lambda: None
    )
    watcher.tick(0.0)
    store = JobStore(store_file, readonly=True)
    assert [Path(s.path).name for s in store.slides()] == ["cell_0000.tif"]
    Image.fromarray(np.full((144, 144, 3), 200, np.uint8)).save(folder / "cell_0000.tif")
    watcher.tick(1.0)
    assert [(Path(s.path).name, s.state) for s in store.slides()] == [("P1", "waiting")]
    cases = store.cases()
    assert [(c.case_key, c.single) for c in cases] == [("P1", 1)]


def test_a_probe_that_fails_unexpectedly_stores_a_sentence_and_logs_the_detail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from appliance.service.audit import AuditLog
    from appliance.service.store import REJECTED, JobStore
    from appliance.service.watcher import PROBE_INTERNAL_ERROR, InboxWatcher, WatchSettings

    inbox = tmp_path / "inbox"
    write(inbox / "smear.tif", b"II*\x00 a scan")

    def broken_probe(path: Path) -> None:
        raise AttributeError("'int' object has no attribute 'name'")

    settings = WatchSettings(inbox, 0.0, 0.0, False, None, lambda: "b" * 64)
    store_file = tmp_path / "jobs.sqlite"
    watcher = InboxWatcher(
        settings, store_file, broken_probe, AuditLog(tmp_path / "audit.jsonl"), lambda: None
    )
    watcher.tick(0.0)
    watcher.tick(1.0)
    [slide] = JobStore(store_file, readonly=True).slides()
    assert (slide.state, slide.reason) == (REJECTED, PROBE_INTERNAL_ERROR)
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert logged and "no attribute 'name'" in str(logged[0].exc_info[1])
