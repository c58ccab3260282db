"""Field tiles of 512 px, the common tile size of public datasets: a folder whose manifest
lists them as fields is a field folder whatever their size; size decides only when the
manifest says nothing, and a photo too small to hold a cell at the working scale is
refused for that, in a sentence for a technician."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import process_slide
from appliance.readers import (
    CellFolderError,
    FieldFolderError,
    folder_layout,
    open_field_folder,
    probe,
)
from appliance.readers.formats import Layout
from appliance.service.audit import AuditLog
from appliance.service.store import QUEUED, JobStore
from appliance.service.watcher import InboxWatcher, WatchSettings
from cytoedge_demo import synthetic
from cytoedge_demo.synthetic import SmearSpec
from runtime.bundle_format import load_bundle
from tests.conftest import SHARED_DATA, assert_technician_reason

CHULA = SHARED_DATA / "chula-rbc12"
CHULA_UM = 0.2  # the dataset's README: red cells about 35-40 px across, 7.5 um
TILE = 512


def tiles(folder: Path, manifest: dict[str, object], count: int = 6) -> tuple[Path, float]:
    """``count`` 512 x 512 tiles of one smear in ``folder`` with ``manifest``, and their
    pixel size: real Chula fields (the middle 480 px square of each photo, enlarged to
    512 px, so 0.2 * 480 / 512 um/px), or synthetic fields at 0.25 um/px without them."""
    folder.mkdir(parents=True)
    photos = sorted(CHULA.glob("*.jpg"))[:count] if CHULA.is_dir() else []
    um = CHULA_UM * 480 / TILE if photos else 0.25
    for index in range(count):
        if photos:
            image = Image.open(photos[index]).convert("RGB").crop((80, 0, 560, 480))
            image = image.resize((TILE, TILE), Image.Resampling.LANCZOS)
        else:
            spec = SmearSpec(width=TILE, height=TILE, seed=index, nucleated_per_mm2=1200)
            image = Image.fromarray(synthetic.render_field(spec).image)
        image.save(folder / f"{100 + index}.jpg", quality=95)
    names = sorted(p.name for p in folder.glob("*.jpg"))
    text = {k: (names if v == "all" else v) for k, v in manifest.items()}
    (folder / "manifest.json").write_text(json.dumps({"pixel_size_um": um, **text}))
    return folder, um


def test_tiles_the_manifest_lists_as_fields_are_a_field_folder(tmp_path: Path) -> None:
    folder, um = tiles(tmp_path / "marrow-1", {"fields": "all"})
    assert folder_layout(folder) is Layout.FIELD_FOLDER
    opened = open_field_folder(folder)
    assert [p.name for p in opened.fields] == [f"{n}.jpg" for n in range(100, 106)]
    info = probe(folder)
    assert (info.format, info.width, info.pixel_size_um) == ("fields", 6, um)


def test_without_a_list_size_decides_and_the_refusal_says_how_to_list_fields(
    tmp_path: Path,
) -> None:
    folder, _ = tiles(tmp_path / "marrow-1", {})
    assert folder_layout(folder) is Layout.CELL_FOLDER  # 512 px: the size of a crop
    with pytest.raises(CellFolderError, match='as "fields"') as caught:
        probe(folder)
    assert_technician_reason(caught.value.reason)


def test_a_photo_too_small_to_hold_a_cell_is_refused_for_that(tmp_path: Path) -> None:
    folder, _ = tiles(tmp_path / "marrow-1", {"fields": "all"}, count=2)
    # At 0.05 um/px a 512 px tile shows 26 um: under the 32 um (128 px at 0.25 um/px)
    # that a cell and the crop around it need.
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "pixel_size_um": 0.05}))
    with pytest.raises(FieldFolderError, match="too small to hold a white cell") as caught:
        open_field_folder(folder)
    assert "26 x 26 um" in caught.value.reason
    assert_technician_reason(caught.value.reason)
    # Its own sidecar says it was taken at a coarser scale: that photo alone is refused.
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "101.jpg.json").write_text('{"pixel_size_um": 0.04}')
    with pytest.raises(FieldFolderError, match=r"field 101\.jpg shows only 20 x 20 um"):
        open_field_folder(folder)


def test_the_inbox_takes_a_declared_folder_of_tiles(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder, _ = tiles(inbox / "BM-7" / "smear-1", {"fields": "all"})
    store_file = tmp_path / "jobs.sqlite"
    watcher = InboxWatcher(
        WatchSettings(inbox, 0.0, 0.0, False, None, lambda: "b" * 64),
        store_file,
        probe,
        AuditLog(tmp_path / "audit.jsonl"),
        lambda: None,
    )
    watcher.tick(0.0)
    watcher.tick(1.0)
    [slide] = JobStore(store_file, readonly=True).slides()
    assert (Path(slide.path), slide.state) == (folder, QUEUED), slide.reason


@pytest.mark.slow
def test_a_declared_folder_of_tiles_goes_through_the_pipeline(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    folder, um = tiles(tmp_path / "BM-7" / "smear-1", {"fields": "all"})
    with SlideNetworks(load_bundle(tiny_bundle)) as networks:
        slide = process_slide(folder, networks, cache_dir=tmp_path / "cache")
    assert (slide.scan.fields, slide.scan.format, slide.scan.pixel_size_um) == (
        6,
        "fields:jpeg",
        um,
    )
    side = round(TILE * um / 0.25)  # each tile on the contact sheet at 0.25 um/px
    assert slide.scan.width == 3 * side + 2 * 16 and slide.scan.height == 2 * side + 16
