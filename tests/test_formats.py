"""One table of formats drives the inbox watcher and the readers alike (doctor: test_cli)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.readers import (
    CellFolderError,
    NotBrightfieldError,
    ScanError,
    UnsupportedScanError,
    formats,
    open_cell_folder,
    open_field_folder,
    open_scan,
    probe,
)
from appliance.readers.formats import MAX_CELL_SIDE, Layout
from appliance.service.audit import AuditLog
from appliance.service.inbox_layout import discover
from appliance.service.store import REJECTED, JobStore
from appliance.service.watcher import InboxWatcher, WatchSettings
from cytoedge_demo import synthetic


def stained_tiff(path: Path) -> Path:
    synthetic.write_smear(path, synthetic.SmearSpec(width=512, height=512, seed=3))
    return path


def test_every_extension_in_the_table_is_a_scan_for_the_inbox_and_the_readers(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for ext in formats.SCAN_EXTENSIONS:
        (inbox / f"scan{ext}").write_bytes(b"not really a scan, but not empty either")
    units = {u.path.suffix: u for u in discover(inbox).units}
    assert set(units) == formats.SCAN_EXTENSIONS
    for ext, unit in units.items():
        assert unit.supported, ext
        # The readers judge its contents, not its extension.
        with pytest.raises(ScanError) as caught:
            open_scan(unit.path, calibration=0.25)
        assert not isinstance(caught.value, UnsupportedScanError), caught.value
        assert caught.value.reason != formats.unsupported_reason(unit.path)


def test_a_real_tiff_opens_under_every_tiff_based_extension(tmp_path: Path) -> None:
    source = stained_tiff(tmp_path / "smear.tif").read_bytes()
    tiff_based = [f for f in formats.SCAN_FORMATS if formats.Magic(0, b"II*\x00") in f.magic]
    assert {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"} <= {
        ext for f in tiff_based for ext in f.extensions
    }
    for fmt in tiff_based:
        for ext in fmt.extensions:
            path = tmp_path / f"renamed{ext}"
            path.write_bytes(source)
            assert formats.sniff(path) is fmt
            assert probe(path).width == 512, ext


@pytest.mark.parametrize(
    ("name", "content"),
    [("scan.czi", b"ZISRAWFILE" + bytes(200)), ("letter.docx", b"PK\x03\x04" + bytes(200))],
)
def test_an_extension_not_in_the_table_is_refused_by_both_in_the_same_words(
    tmp_path: Path, name: str, content: bytes
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / name
    path.write_bytes(content)
    expected = formats.unsupported_reason(path)
    assert expected.startswith(f"unsupported file type {path.suffix}")
    [unit] = discover(inbox).units
    assert not unit.supported and unit.unsupported_reason == expected
    with pytest.raises(UnsupportedScanError) as caught:
        probe(path, calibration=0.25)
    assert caught.value.reason == expected
    # The watcher stores exactly that reason.
    settings = WatchSettings(inbox, 0.0, 0.0, False, None, lambda: "b" * 64)
    store_file = tmp_path / "jobs.sqlite"
    watcher = InboxWatcher(
        settings, store_file, probe, AuditLog(tmp_path / "audit.jsonl"), lambda: None
    )
    watcher.tick(0.0)
    watcher.tick(1.0)
    [slide] = JobStore(store_file, readonly=True).slides()
    assert (slide.state, slide.reason) == (REJECTED, expected)


def crops(folder: Path, width: int, height: int, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((height, width, 3), 180, np.uint8)).save(folder / f"c{i}.png")
    (folder / ".ready").touch()
    return folder


@pytest.mark.parametrize("shape", [(MAX_CELL_SIDE, MAX_CELL_SIDE), (MAX_CELL_SIDE, 100)])
def test_a_crop_at_the_size_limit_is_a_cell_folder_for_both(
    tmp_path: Path, shape: tuple[int, int]
) -> None:
    folder = crops(tmp_path / "inbox" / "P1", *shape)
    [unit] = discover(tmp_path / "inbox").units
    assert (unit.path, unit.kind) == (folder, Layout.CELL_FOLDER)
    assert len(open_cell_folder(folder)) == 3
    assert probe(folder).format == "cells"


@pytest.mark.parametrize(
    "shape", [(MAX_CELL_SIDE + 1, MAX_CELL_SIDE + 1), (100, MAX_CELL_SIDE + 1)]
)
def test_one_pixel_over_the_limit_is_a_field_folder_for_both(
    tmp_path: Path, shape: tuple[int, int]
) -> None:
    folder = crops(tmp_path / "inbox" / "P1", *shape)
    [unit] = discover(tmp_path / "inbox").units
    # Photos larger than a cell: one smear's fields, a case of one at the top of the inbox.
    assert (unit.path, unit.kind, unit.case_key, unit.single) == (
        folder,
        Layout.FIELD_FOLDER,
        "P1",
        True,
    )
    with pytest.raises(CellFolderError, match=f"at most {MAX_CELL_SIDE} px a side"):
        open_cell_folder(folder)
    # At 0.5 um/px the narrow photos show 50 um across: room for a cell.
    assert len(open_field_folder(folder, 0.5)) == 3
    # The probe opens the first photo as a field: these grey squares are no stained smear.
    with pytest.raises(NotBrightfieldError, match="grayscale"):
        probe(folder, 0.5)
