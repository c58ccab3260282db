"""A scan file up to its kept cells: reader -> cellular zone -> stains -> tiles
best-first (``tiles.visiting_order``) -> per tile QC, normalisation, StarDist and the
cell filters, until the bundle's cell budget (``cells.max_cells_per_slide``)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from appliance.pipeline import qc, stain, tiles
from appliance.pipeline.cell_finding import SlideParams, cells_in_window, thumbnail_grid
from appliance.pipeline.cells import cells_csv, cells_geojson
from appliance.pipeline.embedding_sink import CellSink
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.progress import StageTimer
from appliance.pipeline.slide_cache import SlideCells, SlideInput
from appliance.pipeline.tile_prefetch import prepared_tiles
from appliance.readers import Calibration, Scan, open_scan
from appliance.results.schema import ExaminedRecord, QcRecord

STAIN_SAMPLE_TILES = 8
# A visit stopped by the cell budget still judges this many tiles, one of each part
# of the zone (tiles.visiting_order), so that the slide's QC verdict rests on a
# sample of the whole zone, not on the few tiles that gave the cells.
MIN_JUDGED_TILES = tiles.SPREAD_BLOCKS


def scan_stains(scan: Scan, grid: list[tiles.TileSpec]) -> stain.StainEstimate:
    """The scan's stains: Macenko on tiles spread over its cellular zone (``grid``);
    raises ``stain.StainError``."""
    sample = [t.core for t in tiles.iter_tiles(scan, tiles.sample_specs(grid, STAIN_SAMPLE_TILES))]
    return stain.estimate_stains(sample)


def process_scan(
    path: Path,
    networks: SlideNetworks,
    timer: StageTimer,
    calibration: Calibration | float,
    spool: Path,
) -> tuple[SlideCells, SlideInput, QcRecord]:
    """One scan file -> (cells, what it is, QC verdict); see the module."""
    bundle = networks.bundle
    params = SlideParams.of(bundle)
    timer.progress("read", 0.0)
    with open_scan(path, calibration) as scan:
        opened = time.perf_counter()
        info = scan.info()
        scan_entry = SlideInput(
            path=str(path),
            format=info.format,
            bytes=info.bytes,
            pixel_size_um=info.pixel_size_um,
            width=info.width,
            height=info.height,
        )
        thumb_um, thumb_scale = thumbnail_grid(scan.width, scan.height)
        thumbnail = scan.thumbnail(thumb_um)
        # The cell tables are in the scan's level-0 pixels, so that they overlay it.
        level0_scale = tiles.TARGET_UM_PER_PX / info.pixel_size_um
        zone = tiles.cellular_zone(scan)
        grid = tiles.tile_grid(scan, zone)
        timer.seconds["read"] = time.perf_counter() - opened
        timer.progress("read", 1.0)
        empty = SlideCells.empty(
            bundle.encoder.embed_dim,
            thumbnail,
            thumb_scale,
            params.filters.patch_px,
            len(bundle.cell_classes),
        )
        if not grid:
            return empty, scan_entry, qc.slide_verdict([], params.qc).record()
        with timer.stage("stain"):
            try:
                stains = scan_stains(scan, grid)
            except stain.StainError as exc:
                return empty, scan_entry, QcRecord(verdict=qc.FAIL, reasons=(exc.reason,))
        with timer.stage("plan"):
            basophilic = tiles.in_bands(
                scan.thumbnail(zone.mask_um_per_px), lambda band: stain.basophilic(band, stains)
            )
            scores = tiles.tile_scores(basophilic, zone, params.qc.min_basophilic)
            specs = tiles.visiting_order(grid, scores)
        segmenter = networks.segmenter()
        nuclei_stains = params.nuclei_stains(stains)
        budget = bundle.cells.max_cells_per_slide
        budget_classes = bundle.budget_classes("scans")
        tile_qcs = []
        sink = CellSink(networks, params.filters.patch_px, spool, timer, budget_classes)
        # Closed here, whether the budget stops the visit or an error does: its worker
        # is done with the scan before the scan is closed.
        with contextlib.closing(prepared_tiles(scan, specs, stains, params, timer)) as prepared:
            for index, (tile, result, normalised) in enumerate(prepared):
                tile_qcs.append(result)
                if normalised is not None and not 0 < budget <= sink.counted(budget):
                    spec, m = tile.spec, tile.spec.margin
                    sink.add(
                        cells_in_window(
                            normalised,
                            (m, m, m + spec.height, m + spec.width),
                            segmenter,
                            nuclei_stains,
                            params,
                            timer,
                            origin=spec.origin,
                            tile_id=spec.tile_id,
                        )
                    )
                done = (index + 1) / len(specs)
                if budget > 0:
                    done = max(done, min(sink.counted(budget) / budget, 1.0))
                timer.progress("segment", done)
                if 0 < budget <= sink.counted(budget) and len(tile_qcs) >= MIN_JUDGED_TILES:
                    break
        scan_entry = replace(
            scan_entry,
            examined=ExaminedRecord(
                tiles=len(tile_qcs),
                zone_tiles=len(specs),
                budget=budget,
                stopped="budget" if 0 < budget <= sink.counted(budget) else "zone",
                budget_classes=budget_classes,
                counted=sink.counted(0) if budget_classes else None,
            ),
        )
        verdict = qc.slide_verdict(tile_qcs, params.qc).record()
    if verdict.verdict == qc.FAIL or not sink.count:
        sink.discard()
        return empty, scan_entry, verdict
    found, embeddings, probabilities, patches = sink.finish()
    cells = SlideCells(
        embeddings=embeddings,
        xy=np.array([[c.x, c.y] for c in found], np.float32),
        cell_ids=np.arange(len(found), dtype=np.int64),
        patches=patches,
        table_csv=cells_csv(found, level0_scale),
        geojson=cells_geojson(found, level0_scale),
        thumbnail=thumbnail,
        thumbnail_scale=thumb_scale,
        class_probabilities=probabilities,
    )
    return cells, scan_entry, verdict
