"""Labelled cells in the layouts labs keep them: what a path is, class folders of real
BCCD crops embedded exactly as a single-cell folder is served, and every malformed
input refused with one line naming the file and the row (before any image is
processed)."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from appliance.pipeline.cells import resize_bilinear
from appliance.pipeline.networks import SlideNetworks
from appliance.validation.cohort import PipelineSettings
from appliance.validation.labelled_cells import (
    CROP,
    LabelledCells,
    LabelledCellsError,
    is_labelled_cells,
    read_labelled_cells,
)
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle, load_bundle
from runtime.taxonomy import Taxonomy, load_taxonomy
from tests.conftest import SHARED_DATA
from tests.runtime_models import MEAN, STD, TinyBundle, encoder_reference

BCCD = SHARED_DATA / "bccd-sample"
BOX = ("xmin", "ymin", "xmax", "ymax")
BOX_LABELS = {"WBC": "wbc", "RBC": "rbc", "Platelets": "platelet"}
BCCD_TAXONOMY = {
    "name": "bccd-boxes",
    "title": "The three box labels of the BCCD dataset",
    "classes": [
        {"name": "wbc", "label": "WBC", "lineage": ["white"], "colour": [80, 60, 160]},
        {"name": "rbc", "label": "RBC", "lineage": ["red"], "colour": [200, 60, 60]},
        {
            "name": "platelet",
            "label": "Platelets",
            "lineage": ["platelet"],
            "colour": [60, 160, 60],
        },
    ],
}


def bccd_taxonomy(folder: Path) -> Taxonomy:
    """The BCCD box labels as a site's own taxonomy file, read as the command reads it."""
    path = folder / "bccd-boxes.json"
    path.write_text(json.dumps(BCCD_TAXONOMY), encoding="utf-8")
    return load_taxonomy(path)


def bccd_class_folders(root: Path) -> Path:
    """Every box of the BCCD sample cut out as a crop, ``<image>/<label>/NNN.png``: the
    layout of the public crop datasets, one group folder per photo."""
    if not BCCD.is_dir():
        pytest.skip(f"the BCCD sample is not in {BCCD}")
    for annotation in sorted(BCCD.glob("*.xml")):
        with Image.open(annotation.with_suffix(".jpg")) as photo:
            image = photo.convert("RGB")
        for index, box in enumerate(ET.parse(annotation).getroot().iter("object")):
            corners = [int(float(box.findtext(f"bndbox/{k}") or 0)) for k in BOX]
            folder = root / annotation.stem / (box.findtext("name") or "")
            folder.mkdir(parents=True, exist_ok=True)
            image.crop(tuple(corners)).save(folder / f"{index:03d}.png")
    return root


def read(path: Path, taxonomy: Taxonomy, bundle: Bundle, cache: Path) -> LabelledCells:
    with SlideNetworks(bundle) as networks:
        pipeline = PipelineSettings(cache, RuntimeSettings(), 0.2)
        return read_labelled_cells(path, taxonomy, networks, pipeline, Console(width=120))


@pytest.fixture
def tiny(tmp_path: Path) -> TinyBundle:
    made = TinyBundle(tmp_path / "tiny")
    made.write()
    return made


def test_class_folders_of_bccd_crops_are_embedded_as_a_cell_folder_is_served(
    tiny: TinyBundle, tmp_path: Path
) -> None:
    root = bccd_class_folders(tmp_path / "crops")
    taxonomy = bccd_taxonomy(tmp_path)
    assert is_labelled_cells(root)
    bundle = load_bundle(tiny.path)
    cells = read(root, taxonomy, bundle, tmp_path / "cache")

    counts = cells.class_counts()
    assert set(counts) == {"wbc", "rbc", "platelet"} and counts["rbc"] > counts["wbc"] >= 5
    assert set(cells.how) == {CROP}
    # One group per photo: the folder above the class folders.
    assert set(cells.groups) == {p.name for p in root.iterdir()}
    assert "folders above the class folders" in cells.grouping
    size = bundle.encoder.input.size
    for row in (0, len(cells) // 2, len(cells) - 1):
        source = root / cells.sources[row]
        assert BOX_LABELS[source.parent.name] == cells.labels[row]
        with Image.open(source) as crop:
            image = np.asarray(crop.convert("RGB"))
        # The encoder's numpy twin on the crop resized as a served cell folder resizes it.
        pixels = (resize_bilinear(image, size)[None] / 255.0 - MEAN) / STD
        expected = encoder_reference(pixels.transpose(0, 3, 1, 2), tiny.encoder_w)
        np.testing.assert_allclose(cells.embeddings[row], expected[0], atol=1e-5)
        np.testing.assert_array_equal(
            cells.patches[row], resize_bilinear(image, bundle.cells.patch_px)
        )


def test_class_folders_without_groups_are_cross_validated_by_crop(
    tiny: TinyBundle, tmp_path: Path
) -> None:
    grouped = bccd_class_folders(tmp_path / "grouped")
    flat = tmp_path / "flat"
    for crop in grouped.glob("*/*/*.png"):
        target = flat / crop.parent.name / f"{crop.parent.parent.name}-{crop.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(crop.read_bytes())
    cells = read(flat, bccd_taxonomy(tmp_path), load_bundle(tiny.path), tmp_path / "cache")
    assert len(set(cells.groups)) == len(cells) == len(list(grouped.glob("*/*/*.png")))
    assert "cross-validation is by crop" in cells.grouping


def test_what_a_path_is(tmp_path: Path) -> None:
    points = tmp_path / "points.csv"
    points.write_text("image,x_px,y_px,class\nf.jpg,1,2,RBC\n", encoding="utf-8")
    cases = tmp_path / "cases.csv"
    cases.write_text("case_id,scans,diagnosis\nC1,scans/C1,MDS\n", encoding="utf-8")
    (tmp_path / "classes" / "RBC").mkdir(parents=True)
    (tmp_path / "qupath").mkdir()
    (tmp_path / "qupath" / "f.geojson").write_text("[]", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    assert is_labelled_cells(points)
    assert is_labelled_cells(tmp_path / "classes")
    assert is_labelled_cells(tmp_path / "qupath")
    assert not is_labelled_cells(cases)
    assert not is_labelled_cells(tmp_path / "empty")
    assert not is_labelled_cells(tmp_path / "missing.csv")


def _photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((480, 640, 3), 220, np.uint8)).save(path)
    return path


def _crop(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    return path


def _table(path: Path, rows: list[list[str]], header: tuple[str, ...] = ()) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header or ("image", "x_px", "y_px", "class"))
        writer.writerows(rows)
    return path


def _geojson(path: Path, features: object) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), "utf-8")
    return path


def _point(x: float, y: float, name: str | None) -> dict[str, object]:
    properties = {"classification": {"name": name}} if name else {}
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [x, y]},
        "properties": properties,
    }


def _malformed(root: Path, case: str) -> tuple[Path, str]:
    """An input with one fault, and what its one line must name."""
    _photo(root / "f1.jpg")
    good = ["f1.jpg", "10", "20", "RBC"]
    if case == "unknown class":
        return _table(root / "p.csv", [good, ["f1.jpg", "5", "5", "blast"]]), "p.csv row 3"
    if case == "missing image":
        return _table(root / "p.csv", [good, ["f9.jpg", "5", "5", "RBC"]]), "p.csv row 3"
    if case == "not a number":
        return _table(root / "p.csv", [["f1.jpg", "ten", "5", "RBC"]]), "p.csv row 2, column x_px"
    if case == "short row":
        return _table(root / "p.csv", [good, ["f1.jpg", "5", "RBC"]]), "p.csv row 3"
    if case == "outside the image":
        return _table(root / "p.csv", [good, ["f1.jpg", "700", "5", "RBC"]]), "p.csv row 3"
    if case == "no points":
        return _table(root / "p.csv", []), "p.csv"
    if case == "empty folder":
        (root / "cells").mkdir()
        return root / "cells", "cells"
    if case == "class folder without images":
        _crop(root / "cells" / "RBC" / "a.png")
        (root / "cells" / "WBC").mkdir()
        return root / "cells", "cells/WBC"
    if case == "unknown class folder":
        _crop(root / "cells" / "Blasts" / "a.png")
        return root / "cells", "cells/Blasts"
    if case == "crop too large for a cell folder":
        _photo(root / "cells" / "RBC" / "big.png")
        Image.fromarray(np.full((600, 600, 3), 200, np.uint8)).save(root / "cells/RBC/big.png")
        return root / "cells", "big.png"
    if case == "class and group folders mixed":
        _crop(root / "cells" / "RBC" / "a.png")
        _crop(root / "cells" / "patient-1" / "WBC" / "a.png")
        return root / "cells", "cells/RBC"
    if case == "unknown GeoJSON class":
        _photo(root / "q" / "f1.jpg")
        features = [_point(5, 5, "RBC"), _point(6, 6, "Blast")]
        return _geojson(root / "q" / "f1.geojson", features).parent, "f1.geojson feature 2"
    if case == "GeoJSON without image":
        _photo(root / "q" / "f1.jpg")
        _geojson(root / "q" / "f1.geojson", [_point(5, 5, "RBC")])
        return _geojson(root / "q" / "f2.geojson", [_point(5, 5, "RBC")]).parent, "f2.geojson"
    if case == "GeoJSON line":
        _photo(root / "q" / "f1.jpg")
        line = {"type": "LineString", "coordinates": [[1, 1], [2, 2]]}
        feature = {**_point(1, 1, "RBC"), "geometry": line}
        return _geojson(root / "q" / "f1.geojson", [feature]).parent, "f1.geojson feature 1"
    raise AssertionError(case)


MALFORMED = (
    "unknown class",
    "missing image",
    "not a number",
    "short row",
    "outside the image",
    "no points",
    "empty folder",
    "class folder without images",
    "unknown class folder",
    "crop too large for a cell folder",
    "class and group folders mixed",
    "unknown GeoJSON class",
    "GeoJSON without image",
    "GeoJSON line",
)


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_one_line_naming_the_file_and_row(
    case: str, tiny: TinyBundle, tmp_path: Path
) -> None:
    path, named = _malformed(tmp_path / "input", case)
    taxonomy = bccd_taxonomy(tmp_path)
    with pytest.raises(LabelledCellsError) as refused:
        read(path, taxonomy, load_bundle(tiny.path), tmp_path / "cache")
    message = str(refused.value)
    assert "\n" not in message and named in message, message
    assert not (tmp_path / "cache" / "slides").exists(), "refused before any image was processed"


def test_labels_name_a_class_by_name_or_label_in_any_case(tiny: TinyBundle, tmp_path: Path) -> None:
    root = bccd_class_folders(tmp_path / "crops")
    for folder in root.glob("*/Platelets"):
        folder.rename(folder.with_name("platelet"))  # the class's name, not its label
    for folder in root.glob("*/WBC"):
        folder.rename(folder.with_name("wbc"))
    cells = read(root, bccd_taxonomy(tmp_path), load_bundle(tiny.path), tmp_path / "cache")
    assert set(cells.labels) == {"wbc", "rbc", "platelet"}
