"""Cell post-filters, nucleus, patches and the cell tables (no network needed)."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from appliance.pipeline.cells import (
    CSV_COLUMNS,
    Cell,
    CellCallLabels,
    CellError,
    CellFilters,
    cells_csv,
    cells_geojson,
    crop_patch,
    csv_with_calls,
    encoder_patches,
    geojson_with_calls,
    mask_eccentricity,
    measure_cells,
    polygon_circularity,
    weighted_centroid,
)
from appliance.pipeline.segmentation import Detections

N_RAYS = 32
GLASS = (226, 223, 228)


def star(points: list[tuple[int, int]], radii: list[float], probs: list[float]) -> Detections:
    """Detections of circles: every ray of object i has length radii[i]."""
    return Detections(
        np.asarray(points, np.int64).reshape(-1, 2),
        np.repeat(np.asarray(radii, np.float32)[:, None], N_RAYS, axis=1),
        np.asarray(probs, np.float32),
    )


def drawn_cell(
    shape: tuple[int, int], centre: tuple[int, int], cell_r: float, nucleus_r: float
) -> tuple[np.ndarray, np.ndarray]:
    """RGB tile with one cell (pale cytoplasm, dark nucleus) and its basophilic map."""
    image = np.empty((*shape, 3), np.uint8)
    image[:] = GLASS
    basophilic = np.zeros(shape, np.float32)
    rr, cc = disk(centre, cell_r, shape=shape)
    image[rr, cc] = (170, 160, 205)
    basophilic[rr, cc] = 0.2
    rr, cc = disk(centre, nucleus_r, shape=shape)
    image[rr, cc] = (80, 40, 130)
    basophilic[rr, cc] = 1.0
    return image, basophilic


def test_filters_are_restated_for_the_pixel_size() -> None:
    base = CellFilters()
    assert base.at(0.25) == base
    coarse = base.at(0.5)
    assert coarse.min_object_px == pytest.approx(50)
    assert (coarse.min_area_px, coarse.max_area_px) == pytest.approx((125, 1250))
    assert coarse.patch_px == 64
    assert coarse.closing_px == 1
    fine = base.at(0.125)
    assert (fine.min_area_px, fine.max_area_px, fine.patch_px) == (2000, 20000, 256)
    assert fine.closing_px == 5
    # Shape and confidence thresholds do not depend on the scale.
    assert (coarse.min_circularity, coarse.max_eccentricity, coarse.min_confidence) == (
        0.6,
        0.85,
        0.7,
    )
    with pytest.raises(CellError):
        base.at(0)


def test_the_same_physical_cell_passes_at_both_pixel_sizes() -> None:
    # A 10 um-diameter cell with a 5 um nucleus: 20 px radius at 0.25 um/px, 10 px at 0.5.
    fine_image, fine_baso = drawn_cell((160, 160), (80, 80), 20, 10)
    coarse_image, coarse_baso = drawn_cell((80, 80), (40, 40), 10, 5)
    fine = measure_cells(star([(80, 80)], [20], [0.9]), fine_image, fine_baso, CellFilters())
    scaled = CellFilters().at(0.5)
    coarse = measure_cells(star([(40, 40)], [10], [0.9]), coarse_image, coarse_baso, scaled)
    assert len(fine) == 1 and len(coarse) == 1
    assert coarse[0].area_um2 == pytest.approx(fine[0].area_um2, rel=0.1)
    assert coarse[0].patch is not None and coarse[0].patch.shape == (64, 64, 3)
    # Unscaled numbers would have dropped the coarse cell as too small (~314 px < 500).
    assert (
        measure_cells(star([(40, 40)], [10], [0.9]), coarse_image, coarse_baso, CellFilters()) == []
    )


def test_filters_drop_what_method_md_excludes() -> None:
    image, baso = drawn_cell((200, 200), (100, 100), 24, 12)
    filters = CellFilters()
    kept = measure_cells(star([(100, 100)], [24], [0.9]), image, baso, filters)
    assert len(kept) == 1
    cell = kept[0]
    assert cell.area_px == pytest.approx(math.pi * 24**2, rel=0.05)
    assert cell.nc_ratio == pytest.approx(0.25, abs=0.03)
    assert cell.circularity > 0.95 and cell.eccentricity < 0.2
    # Low confidence, too small, too large.
    assert measure_cells(star([(100, 100)], [24], [0.6]), image, baso, filters) == []
    assert measure_cells(star([(100, 100)], [11], [0.9]), image, baso, filters) == []
    assert measure_cells(star([(100, 100)], [45], [0.9]), image, baso, filters) == []
    # A nucleus filling the whole cell: N:C ratio 1 > 0.8.
    full = np.where(baso > 0, 1.0, 0.0).astype(np.float32)
    full[100, 100] = 1.5  # Otsu needs two levels inside the cell
    assert measure_cells(star([(100, 100)], [24], [0.9]), image, full, filters) == []


def test_an_object_without_a_basophilic_nucleus_is_dropped() -> None:
    # A red cell: round, confident, the right size, but only faintly basophilic
    # everywhere, so Otsu still splits it in two (0.05 vs 0.1) yet finds no nucleus.
    image, baso = drawn_cell((200, 200), (100, 100), 24, 12)
    faint = np.where(baso == 1.0, 0.1, np.where(baso > 0, 0.05, 0.0)).astype(np.float32)
    detections = star([(100, 100)], [24], [0.9])
    assert len(measure_cells(detections, image, faint, CellFilters())) == 1
    assert measure_cells(detections, image, faint, CellFilters(), min_basophilic=0.12) == []
    # A real nucleus (level 0.2..1.0) clears the same floor.
    assert len(measure_cells(detections, image, baso, CellFilters(), min_basophilic=0.12)) == 1


def test_a_darker_rim_of_eosin_is_not_a_nucleus() -> None:
    # A red cell on a real photo after normalisation: part of its eosin deconvolves as
    # basophilic, Otsu splits its darker rim off as a "nucleus" of the right N:C at a level
    # (0.14) above the QC's floor (0.12); but the rim's staining is mostly eosin.
    image, _ = drawn_cell((200, 200), (100, 100), 24, 12)
    rr, cc = disk((100, 100), 24, shape=(200, 200))
    rim = np.zeros((200, 200), bool)
    rim[rr, cc] = np.hypot(rr - 100, cc - 100) > 16
    baso = np.zeros((200, 200), np.float32)
    baso[rr, cc] = 0.14
    baso[rim] = 0.3
    eosin_share = np.where(baso > 0, 0.2, 0.0).astype(np.float32)
    detections = star([(100, 100)], [24], [0.9])
    assert len(measure_cells(detections, image, baso, CellFilters(), min_basophilic=0.12)) == 1
    dropped = measure_cells(
        detections, image, baso, CellFilters(), min_basophilic=0.12, basophilic_share=eosin_share
    )
    assert dropped == []
    # The same pixels stained mostly by the basophilic dye are a nucleus (N:C about 0.56).
    nuclear_share = np.where(baso > 0, 0.9, 0.0).astype(np.float32)
    [cell] = measure_cells(
        detections, image, baso, CellFilters(), min_basophilic=0.12, basophilic_share=nuclear_share
    )
    assert cell.nc_ratio == pytest.approx(1 - (16 / 24) ** 2, abs=0.05)
    # A pixel counts by its own share: a basophilic half of the rim alone is too small a
    # nucleus (N:C below 0.2), the other half being eosin.
    half = np.where(cc_grid(200) < 100, nuclear_share, eosin_share).astype(np.float32)
    assert measure_cells(detections, image, baso, CellFilters(), basophilic_share=half) != []
    quarter = np.where(
        (cc_grid(200) < 100) & (rr_grid(200) < 100), nuclear_share, eosin_share
    ).astype(np.float32)
    assert measure_cells(detections, image, baso, CellFilters(), basophilic_share=quarter) == []


def cc_grid(side: int) -> np.ndarray:
    return np.broadcast_to(np.arange(side)[None, :], (side, side))


def rr_grid(side: int) -> np.ndarray:
    return np.broadcast_to(np.arange(side)[:, None], (side, side))


def test_elongated_objects_are_dropped() -> None:
    dist = np.full((1, N_RAYS), 12, np.float32)
    angles = 2 * np.pi * np.arange(N_RAYS) / N_RAYS
    # Rays of an ellipse with semi-axes 40 and 12: eccentricity ~0.95 (> 0.85).
    dist[0] = 1 / np.sqrt((np.sin(angles) / 40) ** 2 + (np.cos(angles) / 12) ** 2)
    image, baso = drawn_cell((200, 200), (100, 100), 12, 6)
    rr, cc = ellipse(100, 100, 40, 12, shape=(200, 200))
    baso[rr, cc] = np.maximum(baso[rr, cc], 0.2)
    found = Detections(np.array([[100, 100]]), dist, np.array([0.95], np.float32))
    assert measure_cells(found, image, baso, CellFilters()) == []
    rows, cols = found.polygons()[0].T
    assert mask_eccentricity(np.zeros((3, 3), bool)) == 1.0
    assert polygon_circularity(np.stack([cols, rows], 1)) < 0.75


def test_nucleus_centroid_is_intensity_weighted() -> None:
    image, baso = drawn_cell((200, 200), (100, 100), 26, 13)
    # Move the nucleus off-centre: centre (94, 108).
    baso[baso == 1.0] = 0.2
    rr, cc = disk((94, 108), 13, shape=baso.shape)
    baso[rr, cc] = 1.0
    cell = measure_cells(star([(100, 100)], [26], [0.9]), image, baso, CellFilters())[0]
    assert (cell.y, cell.x) == pytest.approx((94, 108), abs=0.3)
    # A brighter right half pulls the centre right by the weighted mean of the columns.
    weights = np.zeros((21, 21), np.float32)
    mask = np.zeros((21, 21), bool)
    mask[5:16, 5:16] = True
    weights[5:16, 5:11] = 1.0
    weights[5:16, 11:16] = 3.0
    row, col = weighted_centroid(weights, mask)
    cols = np.arange(5, 16)
    expected = (cols * np.where(cols >= 11, 3.0, 1.0)).sum() / np.where(cols >= 11, 3.0, 1.0).sum()
    assert row == pytest.approx(10.0)
    assert col == pytest.approx(expected)


def test_patch_is_centred_and_padded_with_background_at_borders() -> None:
    image = np.arange(100 * 120 * 3, dtype=np.uint32).reshape(100, 120, 3) % 200
    image = image.astype(np.uint8)
    patch = crop_patch(image, 50, 60, 32, GLASS)
    np.testing.assert_array_equal(patch, image[34:66, 44:76])
    corner = crop_patch(image, 3, 5, 32, GLASS)
    # Rows/columns before the image's start are glass; the rest is the image.
    np.testing.assert_array_equal(corner[:13], np.broadcast_to(GLASS, (13, 32, 3)))
    np.testing.assert_array_equal(corner[:, :11], np.broadcast_to(GLASS, (32, 11, 3)))
    np.testing.assert_array_equal(corner[13:, 11:], image[0:19, 0:21])
    # A cell at the tile's edge keeps its full patch size.
    edge_image, edge_baso = drawn_cell((120, 120), (100, 100), 20, 10)
    cell = measure_cells(
        star([(100, 100)], [20], [0.9]), edge_image, edge_baso, CellFilters(), background=GLASS
    )[0]
    assert cell.patch is not None and cell.patch.shape == (128, 128, 3)
    assert tuple(cell.patch[-1, -1]) == GLASS
    batch = encoder_patches([cell, cell])
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.uint8
    assert tuple(batch[0, 112, 112]) == tuple(cell.patch[64, 64])


def some_cells() -> list[Cell]:
    image, baso = drawn_cell((300, 300), (100, 100), 24, 12)
    rr, cc = disk((200, 210), 20, shape=baso.shape)
    baso[rr, cc] = 0.2
    rr, cc = disk((200, 210), 10, shape=baso.shape)
    baso[rr, cc] = 1.0
    found = star([(100, 100), (200, 210)], [24, 20], [0.9, 0.8])
    return measure_cells(found, image, baso, CellFilters(), origin=(1000, 2000), tile_id=7)


def test_geojson_is_a_qupath_detection_collection() -> None:
    cells = some_cells()
    assert len(cells) == 2
    collection = json.loads(json.dumps(cells_geojson(cells, level0_scale=0.5)))
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == 2
    for index, feature in enumerate(collection["features"]):
        assert feature["type"] == "Feature"
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        (ring,) = geometry["coordinates"]
        assert len(ring) == N_RAYS + 1 and ring[0] == ring[-1]
        assert all(len(p) == 2 and all(isinstance(v, float) for v in p) for p in ring)
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["classification"]["name"]
        measurements = properties["measurements"]
        assert all(isinstance(v, int | float) for v in measurements.values())
        assert measurements["cell_id"] == index and measurements["tile_id"] == 7
        assert "attention" not in measurements
        # Level-0 coordinates: slide coordinates at 0.25 um/px times the scale.
        xs = [p[0] for p in ring]
        assert min(xs) <= cells[index].x * 0.5 <= max(xs)
    assert collection["features"][0]["properties"]["measurements"]["centroid_x"] == pytest.approx(
        0.5 * 1100, abs=0.5
    )


def test_attention_is_added_to_both_tables_by_position_and_checked() -> None:
    cells = some_cells()
    collection = geojson_with_calls(cells_geojson(cells), "s1", np.array([0.25, 0.75]))
    features = collection["features"]
    assert [f["properties"]["measurements"]["attention"] for f in features] == [0.25, 0.75]
    assert {f["properties"]["slide"] for f in features} == {"s1"}
    unscored = geojson_with_calls(cells_geojson(cells), "s1", None)["features"]
    assert "attention" not in unscored[0]["properties"]["measurements"]
    rows = list(csv.DictReader(io.StringIO(csv_with_calls(cells_csv(cells), np.array([0.1, 0.9])))))
    assert list(rows[0]) == [*CSV_COLUMNS, "attention"]
    assert float(rows[1]["attention"]) == pytest.approx(0.9)
    assert csv_with_calls(cells_csv(cells), None) == cells_csv(cells)
    with pytest.raises(CellError, match="2 cells"):
        geojson_with_calls(cells_geojson(cells), "s1", np.array([1.0]))
    with pytest.raises(CellError, match="2 cells"):
        csv_with_calls(cells_csv(cells), np.array([1.0, 2.0, 3.0]))


def test_cell_calls_colour_the_detections_for_qupath_and_fill_the_table() -> None:
    cells = some_cells()
    calls = CellCallLabels(
        names=["plasma_cell", "lymphocyte"],
        labels=["Plasma cell", "Lymphocyte"],
        colours=[(0, 120, 60), (30, 90, 200)],
        confidence=np.array([0.97, 0.41]),
        sure=np.array([True, False]),
    )
    # The second cell is outside the heads' bag: no attention, but still classified.
    attention = np.array([0.6, np.nan])
    features = geojson_with_calls(cells_geojson(cells), "s1", attention, calls)["features"]
    first, second = (f["properties"] for f in features)
    # QuPath reads a detection's class as classification {name, color [r, g, b]}.
    assert first["classification"] == {"name": "Plasma cell", "color": [0, 120, 60]}
    assert second["classification"] == {"name": "Unsure", "color": [128, 128, 128]}
    assert second["predicted_class"] == "lymphocyte"
    assert second["measurements"]["class_confidence"] == pytest.approx(0.41)
    assert "attention" not in second["measurements"]
    rows = list(csv.DictReader(io.StringIO(csv_with_calls(cells_csv(cells), attention, calls))))
    assert [r["cell_class"] for r in rows] == ["plasma_cell", "lymphocyte"]
    assert [r["class_sure"] for r in rows] == ["1", "0"]
    assert rows[0]["attention"] != "" and rows[1]["attention"] == ""


def test_csv_holds_one_row_per_cell_with_its_polygon_in_level0_pixels() -> None:
    cells = some_cells()
    rows = list(csv.DictReader(io.StringIO(cells_csv(cells, level0_scale=0.5))))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [int(r["cell_id"]) for r in rows] == [0, 1]
    assert float(rows[0]["x"]) == pytest.approx(0.5 * 1100, abs=0.5)
    assert float(rows[0]["y"]) == pytest.approx(0.5 * 2100, abs=0.5)
    # Areas are physical: the level-0 scale does not change them.
    assert float(rows[0]["area_um2"]) == pytest.approx(cells[0].area_um2, abs=0.01)
    assert float(rows[0]["nucleus_area_um2"]) == pytest.approx(
        cells[0].nc_ratio * cells[0].area_um2, abs=0.01
    )
    wkt = rows[0]["polygon_wkt"]
    assert wkt.startswith("POLYGON ((") and wkt.endswith("))")
    vertices = wkt[len("POLYGON ((") : -2].split(", ")
    assert len(vertices) == N_RAYS + 1 and vertices[0] == vertices[-1]
    xs = [float(v.split()[0]) for v in vertices]
    assert min(xs) <= 0.5 * cells[0].x <= max(xs)


def test_filters_come_from_the_bundle_section() -> None:
    from runtime.bundle_format import CellsSpec
    from runtime.typed_json import SpecError, parse_section

    assert CellFilters.of(CellsSpec()) == CellFilters()
    section = {"min_confidence": 0.5, "patch_px": 96, "min_cells": 50}
    custom = CellFilters.of(parse_section(CellsSpec, section, "cells"))
    assert (custom.min_confidence, custom.patch_px, custom.max_area_px) == (0.5, 96, 5000.0)
    # A malformed section is refused where the bundle is read, naming the key.
    with pytest.raises(SpecError, match="min_area_px"):
        parse_section(CellsSpec, {"min_area_px": "large"}, "cells")
    with pytest.raises(SpecError, match="min_area_px exceeds max_area_px"):
        parse_section(CellsSpec, {"min_area_px": 6000}, "cells")
