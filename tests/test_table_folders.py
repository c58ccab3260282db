"""A cases table's folders are files at rest: they are used as they are, without the
``.ready`` the inbox waits for while a folder is still being copied into it."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image
from rich.console import Console

from appliance.pipeline.networks import SlideNetworks
from appliance.readers import open_cell_folder, open_field_folder, probe
from appliance.service.audit import AuditLog
from appliance.service.inbox_layout import folder_complete
from appliance.service.store import QUEUED, WAITING, JobStore
from appliance.service.watcher import InboxWatcher, WatchSettings
from appliance.validation.cases_table import read_cases_table
from appliance.validation.cohort import PipelineSettings, process_cohort
from cytoedge_demo import synthetic
from runtime.backends import RuntimeSettings
from tests.conftest import SHARED_DATA
from tests.runtime_models import TinyBundle

BCCD = SHARED_DATA / "bccd-sample"
MARGIN = 1.2  # a crop is the cell's box and a rim, as an analyser exports it


def bccd_crops() -> list[Image.Image]:
    """A square crop around every white and red cell the BCCD annotations box (real
    cells), inside its photo."""
    crops = []
    for xml in sorted(BCCD.glob("*.xml")):
        photo = Image.open(xml.with_suffix(".jpg")).convert("RGB")
        for obj in ET.parse(xml).getroot().iter("object"):
            box = obj.find("bndbox")
            if obj.findtext("name") not in ("WBC", "RBC") or box is None:
                continue
            x0, y0, x1, y1 = (float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
            side = min(round(max(x1 - x0, y1 - y0) * MARGIN), *photo.size)
            left = min(max(round((x0 + x1 - side) / 2), 0), photo.width - side)
            top = min(max(round((y0 + y1 - side) / 2), 0), photo.height - side)
            crops.append(photo.crop((left, top, left + side, top + side)))
    return crops


def cell_folders(root: Path, patients: int, cells: int) -> list[Path]:
    """One folder of crops per patient, as an analyser exports them: no .ready, no manifest
    (real BCCD cells; synthetic ones where ../shared is absent)."""
    if BCCD.is_dir():
        crops = bccd_crops()
    else:
        patches = synthetic.render_cell_patches(patients * cells, seed=3)
        crops = [Image.fromarray(p[40:184, 40:184]) for p in patches]
    folders = []
    for patient in range(patients):
        folder = root / "cells" / f"PB-{patient + 1:04d}"
        folder.mkdir(parents=True)
        for index in range(cells):
            crops[patient * cells + index].save(folder / f"c{index:03d}.png")
        folders.append(folder)
    return folders


def test_a_table_of_cell_folders_without_ready_is_embedded_as_it_is(tmp_path: Path) -> None:
    folders = cell_folders(tmp_path, patients=4, cells=5)
    # The diagnoses are placeholders: these cells come from no such patients.
    rows = [f"{f.name},cells/{f.name},{('MDS', 'healthy')[n % 2]}" for n, f in enumerate(folders)]
    (tmp_path / "cases.csv").write_text("case_id,scans,diagnosis\n" + "\n".join(rows) + "\n")
    table = read_cases_table(tmp_path / "cases.csv")
    assert [case.scans for case in table.cases] == [(f,) for f in folders]

    bundle = TinyBundle(tmp_path / "bundle").write()
    pipeline = PipelineSettings(tmp_path / "cache", RuntimeSettings(threads=1))
    with SlideNetworks(bundle, pipeline.runtime) as networks:
        cohort = process_cohort(table, networks, pipeline, Console(file=io.StringIO()))
    for case in cohort:
        assert case.rejected == (), case.rejected
        assert [s.n_cells for s in case.slides] == [5]
        assert case.left_out(min_cells=5) is None


def test_the_readers_open_folders_as_they_are_and_the_inbox_still_waits(tmp_path: Path) -> None:
    [cells] = cell_folders(tmp_path, patients=1, cells=3)
    fields = tmp_path / "fields"
    fields.mkdir()
    spec = synthetic.SmearSpec(width=640, height=480, seed=2, nucleated_per_mm2=1200)
    Image.fromarray(synthetic.render_field(spec).image).save(fields / "f01.png")
    assert len(open_cell_folder(cells)) == 3 and len(open_field_folder(fields, 0.25)) == 1
    assert not folder_complete(cells) and not folder_complete(fields)

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cells = cells.rename(inbox / cells.name)
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
    assert slide.state == WAITING  # still being copied, as far as the inbox can tell
    (cells / ".ready").touch()
    watcher.tick(2.0)
    watcher.tick(3.0)
    [slide] = JobStore(store_file, readonly=True).slides()
    assert slide.state == QUEUED, slide.reason
