"""Labelled points on real photos (Chula RBC-12) and on a scan, through the bundle's own
cell path: each point takes the kept cell that holds it, or a crop around it as the
pipeline crops, both counted and said; the same points as a QuPath GeoJSON export give
the same cells."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from appliance.console import counted
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.slides import process_slide
from appliance.validation.cohort import PipelineSettings
from appliance.validation.labelled_cells import (
    AROUND_POINT,
    SEGMENTED,
    LabelledCells,
    read_labelled_cells,
)
from runtime.backends import RuntimeSettings
from runtime.bundle_format import load_bundle
from runtime.taxonomy import Taxonomy, load_taxonomy
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow
CHULA = SHARED_DATA / "chula-rbc12"
# Chula RBC-12 records no pixel size; its README: red cells about 35-40 px across, which
# puts the camera near 0.2 um/px (a red cell is about 7.5 um). Given as --pixel-size would.
CHULA_UM = 0.2
IMAGES = ("100", "101", "105", "106")  # the first four of the sample, by name


def chula_points(folder: Path, taxonomy: Taxonomy) -> list[tuple[str, float, float, str]]:
    """(image, x, y, class) of every labelled red cell of a few photos, copied into
    ``folder``; the class ids 0-12 of ``N.txt`` are the rbc-morphology taxonomy's order."""
    if not CHULA.is_dir():
        pytest.skip(f"the Chula RBC-12 sample is not in {CHULA}")
    folder.mkdir(parents=True, exist_ok=True)
    points = []
    for stem in IMAGES:
        (folder / f"{stem}.jpg").write_bytes((CHULA / f"{stem}.jpg").read_bytes())
        for line in (CHULA / f"{stem}.txt").read_text().splitlines():
            if line.strip():
                x, y, label = line.split()
                points.append((f"{stem}.jpg", float(x), float(y), taxonomy.names[int(label)]))
    return points


def read(
    path: Path, taxonomy: Taxonomy, bundle_path: Path, cache: Path
) -> tuple[LabelledCells, str]:
    console = Console(record=True, width=200)
    with SlideNetworks(load_bundle(bundle_path)) as networks:
        pipeline = PipelineSettings(cache, RuntimeSettings(), CHULA_UM)
        cells = read_labelled_cells(path, taxonomy, networks, pipeline, console)
    return cells, console.export_text()


@dataclass(frozen=True)
class ChulaTable:
    points: list[tuple[str, float, float, str]]
    folder: Path  # the photos and points.csv
    cache: Path
    cells: LabelledCells
    said: str  # what the console printed


@pytest.fixture(scope="module")
def chula_table(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> ChulaTable:
    """The labelled red cells of a few photos as a points table, read once."""
    root = tmp_path_factory.mktemp("chula")
    points = chula_points(root / "photos", load_taxonomy("rbc-morphology"))
    table = root / "photos" / "points.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image", "x_px", "y_px", "class"), *points])
    cells, said = read(table, load_taxonomy("rbc-morphology"), tiny_bundle, root / "cache")
    return ChulaTable(points, root / "photos", root / "cache", cells, said)


def test_chula_points_are_matched_to_kept_cells_or_cropped_around_and_counted(
    tiny_bundle: Path, chula_table: ChulaTable
) -> None:
    points, cells, said = chula_table.points, chula_table.cells, chula_table.said
    assert len(cells) == len(points) and cells.labels == tuple(p[3] for p in points)
    assert cells.groups == tuple(p[0] for p in points)  # cross-validated by photo
    assert (
        cells.sources[0] == "points.csv:2" and cells.sources[-1] == f"points.csv:{len(points) + 1}"
    )
    how = cells.how_counts()
    assert how.get(SEGMENTED, 0) + how[AROUND_POINT] == len(points)
    assert how[AROUND_POINT] > 0  # red cells are not what the pipeline keeps
    said = " ".join(said.split())
    assert f"{counted(how.get(SEGMENTED, 0), 'point')} matched to a segmented cell" in said
    assert f"{how[AROUND_POINT]} cropped around the point" in said
    assert cells.patches.shape[1:] == (128, 128, 3)
    assert np.isfinite(cells.embeddings).all()

    # A matched point carries its kept cell (embedding and crop) as the slide cache holds it.
    with SlideNetworks(load_bundle(tiny_bundle)) as networks:
        slides = {
            name: process_slide(chula_table.folder / name, networks, cache_dir=chula_table.cache)
            for name in {p[0] for p in points}
        }
    for row, (image, *_rest) in enumerate(points):
        slide = slides[image]
        kept = slide.cells().embeddings if slide.qc_passed and slide.n_cells else np.zeros((0, 1))
        same = (np.abs(kept - cells.embeddings[row]).max(axis=1) == 0).any() if len(kept) else False
        assert same == (cells.how[row] == SEGMENTED), (row, cells.sources[row])


def test_the_same_points_as_qupath_geojson_give_the_same_cells(
    tiny_bundle: Path, chula_table: ChulaTable, tmp_path: Path
) -> None:
    taxonomy = load_taxonomy("rbc-morphology")
    points, from_table = chula_table.points, chula_table.cells
    qupath = tmp_path / "qupath"
    chula_points(qupath, taxonomy)
    for stem in IMAGES:
        features = []
        for index, (_, x, y, label) in enumerate(p for p in points if p[0] == f"{stem}.jpg"):
            name = taxonomy.cell_class(label).label  # QuPath names the class by its label
            geometry: dict[str, object] = {"type": "Point", "coordinates": [x, y]}
            if index == 0:  # an outline instead: counted by its centroid, the same place
                ring = [
                    [x - 6, y - 6],
                    [x + 6, y - 6],
                    [x + 6, y + 6],
                    [x - 6, y + 6],
                    [x - 6, y - 6],
                ]
                geometry = {"type": "Polygon", "coordinates": [ring]}
            features.append(
                {
                    "type": "Feature",
                    "geometry": geometry,
                    "properties": {"classification": {"name": name}},
                }
            )
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}})
        collection = {"type": "FeatureCollection", "features": features}
        (qupath / f"{stem}.geojson").write_text(json.dumps(collection), encoding="utf-8")
    from_qupath, said = read(qupath, taxonomy, tiny_bundle, chula_table.cache)

    assert from_qupath.labels == from_table.labels and from_qupath.how == from_table.how
    assert from_qupath.groups == from_table.groups
    np.testing.assert_allclose(from_qupath.embeddings, from_table.embeddings, atol=1e-5)
    said = " ".join(said.split())
    assert f"{len(IMAGES)} polygons counted as the point at their centroid" in said
    assert f"{len(IMAGES)} features without a classification left out" in said


def test_points_on_a_scan_take_its_kept_cells_or_a_crop_of_its_tiles(
    tiny_bundle: Path, small_scan_writer, tmp_path: Path
) -> None:
    scan = small_scan_writer(tmp_path / "scans" / "smear.tif", seed=3, size=1024)
    bundle = load_bundle(tiny_bundle)
    with SlideNetworks(bundle) as networks:
        slide = process_slide(scan, networks, cache_dir=tmp_path / "cache")
    table = list(csv.DictReader(slide.cells().table_csv.splitlines()))
    assert len(table) >= 2
    taxonomy = load_taxonomy("pb-wbc")
    rows = [["smear.tif", table[0]["x"], table[0]["y"], "Lymphocyte"]]
    rows += [["smear.tif", "3", "3", "platelet"]]  # the corner: glass, no kept cell
    points = tmp_path / "scans" / "points.csv"
    with open(points, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image", "x_px", "y_px", "class"), *rows])
    cells, said = read(points, taxonomy, tiny_bundle, tmp_path / "cache")
    assert cells.how == (SEGMENTED, AROUND_POINT) and cells.labels == ("lymphocyte", "platelet")
    np.testing.assert_array_equal(cells.embeddings[0], slide.cells().embeddings[0])
    np.testing.assert_array_equal(cells.patches[0], slide.cells().patches[0])
    # The corner crop: mostly glass, the part beyond the scan padded with the glass colour.
    assert cells.patches[1].mean() > 150 and np.isfinite(cells.embeddings[1]).all()
    assert "1 point matched to a segmented cell, 1 cropped around the point" in " ".join(
        said.split()
    )
