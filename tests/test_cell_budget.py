"""A scan's work is bounded by the bundle's cell budget: tiles best-first, spread over
the zone, and the result says how much of the zone was examined and why it stopped."""

from __future__ import annotations

import csv
import dataclasses
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.pipeline import qc, stain, tiles
from appliance.pipeline.bags import case_shares
from appliance.pipeline.cases import score_case
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.scans import MIN_JUDGED_TILES
from appliance.pipeline.slides import process_slide
from appliance.readers import open_scan
from appliance.results.schema import ExaminedRecord
from cytoedge_demo.synthetic import SmearSpec, render_field
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle, CellsSpec, load_bundle
from runtime.typed_json import SpecError, parse_section


def every_cell(bundle: Bundle) -> Bundle:
    """The bundle with its case heads reading every cell, so that the budget counts every
    kept cell (the budget of a bag of some classes: tests/test_cell_head_serving.py)."""
    heads = tuple(dataclasses.replace(h, bag_classes=()) for h in bundle.heads)
    return dataclasses.replace(bundle, heads=heads)


def grid_specs(rows: int, cols: int) -> list[tiles.TileSpec]:
    return [
        tiles.TileSpec(r * cols + c, r, c, c * tiles.TILE_PX, r * tiles.TILE_PX, 800, 800, 0)
        for r in range(rows)
        for c in range(cols)
    ]


def test_the_visit_takes_every_block_before_a_second_tile_of_any() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((12, 12))
    scores[:6, :6] += 10.0  # one corner far better than the rest
    specs = grid_specs(12, 12)
    order = tiles.visiting_order(specs, scores)
    assert sorted(s.tile_id for s in order) == [s.tile_id for s in specs], "each tile once"
    # 12 x 12 tiles in blocks of 3 x 3: the first 16 visits are one tile of each block.
    first = {(s.row // 3, s.col // 3) for s in order[:16]}
    assert len(first) == 16
    # Within a block, best first; the first visit is the best tile of the slide.
    assert (order[0].row, order[0].col) == np.unravel_index(np.argmax(scores), scores.shape)
    block = [s for s in order if (s.row // 3, s.col // 3) == (0, 0)]
    assert [scores[s.row, s.col] for s in block] == sorted(
        (scores[s.row, s.col] for s in block), reverse=True
    )


def test_a_dense_half_of_a_smear_scores_above_its_sparse_half(tmp_path: Path) -> None:
    """Scored on the thumbnail's basophilic channel: more nuclei, a higher score."""
    halves = [
        render_field(SmearSpec(width=1600, height=3200, seed=5, nucleated_per_mm2=density)).image
        for density in (2400.0, 150.0)
    ]
    path = tmp_path / "halves.png"
    Image.fromarray(np.concatenate(halves, axis=1)).save(path)
    with open_scan(path, 0.25) as scan:
        zone = tiles.cellular_zone(scan)
        thumb = scan.thumbnail(zone.mask_um_per_px)
    stains = stain.estimate_stains([np.concatenate(halves, axis=1)])
    scores = tiles.tile_scores(stain.basophilic(thumb, stains), zone, 0.12)
    assert scores.shape == (4, 4)
    dense, sparse = scores[:, :2], scores[:, 2:]
    assert dense.min() > sparse.max(), scores


@pytest.mark.slow
def test_a_budget_stops_the_visit_and_the_result_says_how_much_was_examined(
    tiny_bundle: Path, small_scan_writer, tmp_path: Path
) -> None:
    base = every_cell(load_bundle(tiny_bundle))

    def process(scan: Path, budget: int):
        bundle = dataclasses.replace(
            base, cells=dataclasses.replace(base.cells, max_cells_per_slide=budget)
        )
        settings = RuntimeSettings(backend="ort-cpu", threads=1)
        with SlideNetworks(bundle, settings) as networks:
            return bundle, process_slide(scan, networks, cache_dir=tmp_path / "cache")

    _, whole = process(small_scan_writer(tmp_path / "small.tif", seed=3, size=1600), 0)
    assert whole.scan.examined == ExaminedRecord(4, 4, 0, "zone"), "no budget: every tile"
    assert whole.scan.segmenter_variant == "fp32", "the suite's bundle has no int8 segmenter"
    bundle, part = process(small_scan_writer(tmp_path / "s.tif", seed=3, size=4000), 30)
    examined = part.scan.examined
    assert examined is not None and (examined.stopped, examined.budget) == ("budget", 30)
    # The cells came from the first tile or two; QC still judged one tile of each block.
    assert examined.zone_tiles == 25 and examined.tiles == MIN_JUDGED_TILES == 16
    assert part.n_cells >= 30
    assert not [t for t in threading.enumerate() if t.name == "tile-reader"], "reader stopped"
    case = score_case("B-1", [part], bundle, tmp_path / "out", write_pdf=False)
    [record] = case.result.scans
    assert record.examined == examined, "result.json keeps it"
    report = (case.folder.path / "report.html").read_text(encoding="utf-8")
    sentence = "Examined 16 of 25 tiles of the cellular zone"
    assert sentence in report and "budget of 30 cells" in report


@pytest.mark.slow
def test_an_error_on_the_reading_thread_reaches_the_caller_and_stops_the_reader(
    tiny_bundle: Path, small_scan_writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = small_scan_writer(tmp_path / "s.tif", seed=4, size=2400)
    judged = []

    def failing_qc(tile_id: int, *args: object, **kwargs: object) -> object:
        judged.append(tile_id)
        if len(judged) == 3:
            raise OSError("the scan's disk went away")
        return real_qc(tile_id, *args, **kwargs)

    real_qc = qc.assess_tile
    monkeypatch.setattr(qc, "assess_tile", failing_qc)
    settings = RuntimeSettings(backend="ort-cpu", threads=1)
    with (
        SlideNetworks(load_bundle(tiny_bundle), settings) as networks,
        pytest.raises(OSError, match="disk went away"),
    ):
        process_slide(scan, networks, cache_dir=tmp_path / "cache")
    assert len(judged) == 3, "the reader stopped at the error"
    assert not [t for t in threading.enumerate() if t.name == "tile-reader"]


def test_a_case_budget_is_shared_equally_and_a_small_slide_gives_its_rest_to_the_others() -> None:
    assert case_shares([500, 500, 500], 1000) == [333, 333, 334]
    assert case_shares([100, 900, 700], 900) == [100, 400, 400]
    assert case_shares([100, 900], 0) == [100, 900], "0: no budget"
    assert case_shares([100, 200], 300) == [100, 200], "they fit"
    assert case_shares([], 300) == []


def test_a_case_budget_below_the_cells_a_case_needs_is_refused() -> None:
    with pytest.raises(SpecError, match="max_cells_per_case"):
        parse_section(CellsSpec, {"min_cells": 50, "max_cells_per_case": 20}, "cells")
    assert parse_section(CellsSpec, {"max_cells_per_case": 0}, "cells").max_cells_per_case == 0


@pytest.mark.slow
def test_a_case_budget_takes_each_slides_first_cells_and_the_result_says_what_it_left_out(
    tiny_bundle: Path, small_scan_writer, tmp_path: Path
) -> None:
    base = every_cell(load_bundle(tiny_bundle))
    settings = RuntimeSettings(backend="ort-cpu", threads=1)
    with SlideNetworks(base, settings) as networks:
        slides = [
            process_slide(
                small_scan_writer(tmp_path / f"{seed}.tif", seed=seed, size=1600),
                networks,
                cache_dir=tmp_path / "cache",
            )
            for seed in (5, 6)
        ]
    found = [s.n_cells for s in slides]
    budget = max(base.cells.min_cells, sum(found) - 10)
    assert min(found) > 10 and sum(found) > budget, found
    bundle = dataclasses.replace(
        base, cells=dataclasses.replace(base.cells, max_cells_per_case=budget)
    )
    case = score_case("C-1", slides, bundle, tmp_path / "out", write_pdf=False)
    records = case.result.scans
    assert sum(r.cells for r in records) == case.result.cells == budget
    assert [r.cells + r.cells_set_aside for r in records] == found
    for slide, record in zip(slides, records, strict=True):
        table = (case.folder.path / record.outputs.cells_csv).read_text()
        rows = list(csv.DictReader(io.StringIO(table)))
        assert len(rows) == record.cells + record.cells_set_aside, "every kept cell is shown"
        in_bag = [int(row["cell_id"]) for row in rows if row["attention"]]
        assert in_bag == list(slide.cells().cell_ids[: record.cells]), "the start of the visit"
    with np.load(case.folder.path / "embeddings.npz") as saved:
        assert len(saved["embeddings"]) == budget
    report = (case.folder.path / "report.html").read_text(encoding="utf-8")
    assert "more cells were set aside" in report
    again = score_case("C-1", slides[::-1], bundle, tmp_path / "out", write_pdf=False)
    assert {r.slide_id: r.cells for r in again.result.scans} == {
        r.slide_id: r.cells for r in records
    }, "the shares do not depend on the order the slides came in"
