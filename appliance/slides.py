"""One scan (or single-cell or field folder) up to cached embeddings and its cell table.

``process_slide`` reads the scan, finds its cellular zone, estimates its stains,
runs QC, normalisation and StarDist tile by tile, keeps the cells that pass the
filters (``appliance.cells``), embeds their crops and caches all of it by
(slide content, bundle): a case scored again after a late slide reads it back
instead (``appliance.slide_cache``). A single-cell folder (the PB workflow) skips
straight to the encoder. Microscope-camera photos take the field path
(``appliance.fields``): a field folder, and a single photo, which is a JPEG /
PNG / BMP or a TIFF of one untiled image (``readers.is_field_file``); a tiled
TIFF is a scan. ``appliance.cases.score_case`` takes it from there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from appliance import qc, slide_cache, stain, tiles
from appliance.cells import (
    Cell,
    CellFilters,
    cells_csv,
    cells_geojson,
    encoder_patches,
    measure_cells,
    resize_bilinear,
)
from appliance.fields import process_fields
from appliance.networks import SlideNetworks
from appliance.progress import ProgressCallback, StageTimer, no_progress
from appliance.readers import (
    Calibration,
    FieldFolder,
    Scan,
    ScanNotFoundError,
    folder_layout,
    is_field_file,
    open_cell_folder,
    open_field_folder,
    open_scan,
    scan_fingerprint,
    single_field,
)
from appliance.readers.formats import Layout
from appliance.results.schema import ExaminedRecord, QcRecord, ScanRecord
from appliance.segmentation import Segmenter
from appliance.slide_cache import THUMBNAIL_LONG_SIDE, SlideCells
from appliance.tiles import Tile, TileSpec
from runtime.typed_json import dump, parse_section

_SHA256 = re.compile(r"[0-9a-f]{64}")
MOSAIC_CELL_PX = 32  # a cell folder's "thumbnail": its cells in a grid, this size each
STAIN_SAMPLE_TILES = 8
EMBED_CHUNK = 256  # kept cells embedded at a time, so memory holds a chunk of crops
PREPARED_AHEAD = 2  # tiles read, judged and normalised ahead of the networks
# A visit stopped by the cell budget still judges this many tiles, one of each part
# of the zone (tiles.visiting_order), so that the slide's QC verdict rests on a
# sample of the whole zone, not on the few tiles that gave the cells.
MIN_JUDGED_TILES = tiles.SPREAD_BLOCKS
PASSED = QcRecord(verdict="pass")
CELL_FOLDER_FORMAT = "cells"  # a single-cell folder's ScanRecord.format


@dataclass(frozen=True)
class SlideResult:
    """One processed scan: what result.json says about it, and where its cells are cached."""

    slide_id: str
    path: Path
    scan: ScanRecord
    qc_passed: bool  # a warning is shown, not fatal; a failed slide gives no cells
    qc_reason: str | None
    n_cells: int
    cache_entry: Path
    timings_s: dict[str, float]
    backend: str  # what embedded its cells ("" when it had none)
    from_cache: bool = False

    @property
    def fingerprint(self) -> str:
        return self.scan.sha256

    def cells(self) -> SlideCells:
        return slide_cache.read_cells(self.cache_entry)


def process_slide(
    path: Path | str,
    networks: SlideNetworks,
    *,
    cache_dir: Path,
    calibration: Calibration | float = 0.0,
    slide_id: str | None = None,
    progress: ProgressCallback = no_progress,
    fingerprint: str | None = None,
) -> SlideResult:
    """One scan (or single-cell or field folder) up to cached embeddings and its cell table.

    ``networks``: the bundle's sessions, shared by the caller's slides and opened
    only when a slide needs them. ``calibration``: the configuration's pixel size
    for files without one (``config.calibration``; a number: ``scan.pixel_size_um``
    alone). ``fingerprint``: the sha256 of the scan's content
    when the caller already has it (the service hashes a scan when it arrives);
    computed here otherwise, the same way.

    Raises ``appliance.readers.ScanError`` (with a one-line ``reason``) for an
    input that cannot be used. A slide that fails QC is not an error: it comes
    back with ``qc_passed`` False and no cells.
    """
    path = Path(path)
    bundle = networks.bundle
    slide_id = slide_id or (path.stem if path.is_file() else path.name) or "slide"
    if fingerprint is not None and not _SHA256.fullmatch(fingerprint):
        raise ValueError(f"fingerprint must be a sha256 in lower-case hex, got {fingerprint!r}")
    timer = StageTimer(progress)
    progress("fingerprint", 0.0)
    with timer.stage("fingerprint"):
        if not path.exists():
            raise ScanNotFoundError(path, "file not found")
        digest = fingerprint or scan_fingerprint(path)
    progress("fingerprint", 1.0)
    entry = slide_cache.entry_dir(cache_dir, digest, bundle.slide_sha256)
    meta = slide_cache.read_meta(entry)
    if meta is not None:
        progress("cached", 1.0)
        return _slide_result(meta, slide_id, path, entry, from_cache=True)

    embedded_before = networks.embedded
    spool = cache_dir / "spool" / f"{digest[:16]}-{os.getpid()}-{threading.get_ident()}.raw"
    spool.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.is_dir() and folder_layout(path) is Layout.FIELD_FOLDER:
            fields = open_field_folder(path, calibration)
            cells, scan, verdict = _fields(fields, networks, timer, spool)
        elif path.is_dir():
            cells, scan, verdict = _cell_folder(path, networks, timer)
        elif is_field_file(path):
            cells, scan, verdict = _fields(single_field(path, calibration), networks, timer, spool)
        else:
            cells, scan, verdict = _scan_file(path, networks, timer, calibration, spool)
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    # What embedded this slide (nothing, when it had no cells), and what segmented it.
    embedded = networks.embedded > embedded_before
    segmented = scan["format"] != CELL_FOLDER_FORMAT
    scan = ScanRecord(
        **{**scan, "slide_id": slide_id, "sha256": digest},
        qc=verdict,
        cells=len(cells.embeddings),
        encoder_variant=networks.variant if embedded else None,
        segmenter_variant=networks.segmenter_variant if segmented else None,
    )
    meta = {
        "scan": dump(scan),
        "qc_passed": verdict.verdict != qc.FAIL,
        "qc_reason": "; ".join(verdict.reasons) or None,
        "n_cells": len(cells.embeddings),
        "timings_s": timer.rounded(),
        "backend": networks.backend_name if embedded else "",
    }
    try:
        slide_cache.write_entry(entry, meta, cells)
    finally:
        spool.unlink(missing_ok=True)
    return _slide_result(slide_cache.read_meta(entry) or meta, slide_id, path, entry)


def _slide_result(
    meta: dict[str, object], slide_id: str, path: Path, entry: Path, *, from_cache: bool = False
) -> SlideResult:
    # The cache is shared by every copy of the scan: its name and place are this one's.
    scan = parse_section(
        ScanRecord, {**meta["scan"], "slide_id": slide_id, "path": str(path)}, "scan"
    )
    return SlideResult(
        slide_id=slide_id,
        path=path,
        scan=scan,
        qc_passed=bool(meta["qc_passed"]),
        qc_reason=meta.get("qc_reason"),  # type: ignore[arg-type]
        n_cells=int(meta["n_cells"]),  # type: ignore[arg-type]
        cache_entry=entry,
        timings_s={} if from_cache else dict(meta["timings_s"]),  # type: ignore[arg-type]
        backend=str(meta.get("backend", "")),
        from_cache=from_cache,
    )


# --- a folder of single-cell images -----------------------------------------------------


def _cell_folder(
    path: Path, networks: SlideNetworks, timer: StageTimer
) -> tuple[SlideCells, dict[str, object], QcRecord]:
    """PB workflow: the folder's crops are the cells; no segmentation, no tile QC."""
    bundle = networks.bundle
    size = bundle.encoder.input.fed_px
    patch_px = bundle.cells.patch_px
    with timer.stage("read"):
        folder = open_cell_folder(path)
        names, crops, inputs = [], [], []
        for index, (name, image) in enumerate(folder):
            names.append(name)
            crops.append(resize_bilinear(image, patch_px))
            inputs.append(resize_bilinear(image, size))
            timer.progress("read", (index + 1) / len(folder))
    with timer.stage("embed"):
        embeddings = networks.embed(
            np.stack(inputs), progress=lambda done, total: timer.progress("embed", done / total)
        )
    mosaic, xy = _mosaic(crops)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["cell_id", "file", "x", "y"])
    for index, name in enumerate(names):
        writer.writerow([index, name, f"{xy[index, 0]:.1f}", f"{xy[index, 1]:.1f}"])
    cells = SlideCells(
        embeddings=embeddings,
        xy=xy,
        cell_ids=np.arange(len(names), dtype=np.int64),
        patches=np.stack(crops) if crops else np.zeros((0, patch_px, patch_px, 3), np.uint8),
        table_csv=table.getvalue(),
        geojson={"type": "FeatureCollection", "features": []},
        thumbnail=mosaic,
        thumbnail_scale=1.0,
    )
    scan = {
        "path": str(path),
        "format": CELL_FOLDER_FORMAT,
        "bytes": sum(p.stat().st_size for p in folder.image_paths),
        "pixel_size_um": folder.pixel_size_um,
    }
    return cells, scan, PASSED


def _mosaic(crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A cell folder has no geometry: its picture is its cells in a grid, row-major, and
    each cell's position is its place in that grid."""
    n = len(crops)
    columns = max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, -(-n // columns))
    side = MOSAIC_CELL_PX
    mosaic = np.full((rows * side, columns * side, 3), 255, np.uint8)
    xy = np.zeros((n, 2), np.float32)
    for index, crop in enumerate(crops):
        r, c = divmod(index, columns)
        small = Image.fromarray(crop).resize((side, side))
        mosaic[r * side : (r + 1) * side, c * side : (c + 1) * side] = np.asarray(small)
        xy[index] = ((c + 0.5) * side, (r + 0.5) * side)
    return mosaic, xy


# --- microscope-camera fields ------------------------------------------------------------


def _fields(
    folder: FieldFolder, networks: SlideNetworks, timer: StageTimer, spool: Path
) -> tuple[SlideCells, dict[str, object], QcRecord]:
    """The field path (``appliance.fields``), its cells spooled like a scan's."""
    bundle = networks.bundle
    patch_px = CellFilters.from_section(bundle.cells).at(tiles.TARGET_UM_PER_PX).patch_px
    sink = _CellSink(networks, bundle.encoder.input.fed_px, patch_px, spool, timer)
    return process_fields(folder, networks, timer, sink)


# --- a scan file ---------------------------------------------------------------------------


def _scan_file(
    path: Path,
    networks: SlideNetworks,
    timer: StageTimer,
    calibration: Calibration | float,
    spool: Path,
) -> tuple[SlideCells, dict[str, object], QcRecord]:
    """Reader -> cellular zone -> stains -> tiles best-first (``tiles.visiting_order``)
    -> per tile QC, normalisation, StarDist, cells, until the bundle's cell budget."""
    bundle = networks.bundle
    reference = stain.StainReference.from_section(bundle.stain_reference)
    params = qc.QCParams.from_bundle(dump(bundle.qc), reference)
    # Tiles are on the 0.25 um/px working grid, whatever the scan's own pixel size.
    filters = CellFilters.from_section(bundle.cells).at(tiles.TARGET_UM_PER_PX)
    timer.progress("read", 0.0)
    with open_scan(path, calibration) as scan:
        opened = time.perf_counter()
        info = scan.info()
        scan_entry: dict[str, object] = {
            "path": str(path),
            "format": info.format,
            "bytes": info.bytes,
            "pixel_size_um": info.pixel_size_um,
            "width": info.width,
            "height": info.height,
        }
        long_side = max(scan.width, scan.height) * tiles.TARGET_UM_PER_PX
        thumb_um = max(tiles.TARGET_UM_PER_PX, long_side / THUMBNAIL_LONG_SIDE)
        thumbnail = scan.thumbnail(thumb_um)
        thumb_scale = thumb_um / tiles.TARGET_UM_PER_PX
        # The cell tables are in the scan's level-0 pixels, so that they overlay it.
        level0_scale = tiles.TARGET_UM_PER_PX / info.pixel_size_um
        zone = tiles.cellular_zone(scan)
        grid = tiles.tile_grid(scan, zone)
        timer.seconds["read"] = time.perf_counter() - opened
        timer.progress("read", 1.0)
        empty = SlideCells.empty(bundle.encoder.embed_dim, thumbnail, thumb_scale, filters.patch_px)
        if not grid:
            return empty, scan_entry, qc.slide_verdict([], params).record()
        with timer.stage("stain"):
            sample = [
                t.core for t in tiles.iter_tiles(scan, tiles.sample_specs(grid, STAIN_SAMPLE_TILES))
            ]
            try:
                stains = stain.estimate_stains(sample)
            except stain.StainError as exc:
                return empty, scan_entry, QcRecord(verdict=qc.FAIL, reasons=(exc.reason,))
        with timer.stage("plan"):
            basophilic = tiles.in_bands(
                scan.thumbnail(zone.mask_um_per_px), lambda band: stain.basophilic(band, stains)
            )
            scores = tiles.tile_scores(basophilic, zone, params.min_basophilic)
            specs = tiles.visiting_order(grid, scores)
        segmenter = networks.segmenter()
        # Nuclei are found on normalised tiles, whose stains are the reference's.
        nuclei_stains = reference.estimate if reference is not None else stains
        budget = bundle.cells.max_cells_per_slide
        tile_qcs = []
        sink = _CellSink(networks, bundle.encoder.input.fed_px, filters.patch_px, spool, timer)
        # Closed here, whether the budget stops the visit or an error does: its worker
        # is done with the scan before the scan is closed.
        with contextlib.closing(
            _prepared_tiles(scan, specs, stains, reference, params, timer)
        ) as prepared:
            for index, (tile, result, normalised) in enumerate(prepared):
                tile_qcs.append(result)
                if normalised is not None and not 0 < budget <= sink.count:
                    sink.add(
                        _tile_cells(
                            tile, normalised, segmenter, nuclei_stains, filters, params, timer
                        )
                    )
                done = (index + 1) / len(specs)
                if budget > 0:
                    done = max(done, min(sink.count / budget, 1.0))
                timer.progress("segment", done)
                if 0 < budget <= sink.count and len(tile_qcs) >= MIN_JUDGED_TILES:
                    break
        scan_entry["examined"] = ExaminedRecord(
            tiles=len(tile_qcs),
            zone_tiles=len(specs),
            budget=budget,
            stopped="budget" if 0 < budget <= sink.count else "zone",
        )
        verdict = qc.slide_verdict(tile_qcs, params).record()
    if verdict.verdict == qc.FAIL or not sink.count:
        sink.discard()
        return empty, scan_entry, verdict
    found, embeddings, patches = sink.finish()
    cells = SlideCells(
        embeddings=embeddings,
        xy=np.array([[c.x, c.y] for c in found], np.float32),
        cell_ids=np.arange(len(found), dtype=np.int64),
        patches=patches,
        table_csv=cells_csv(found, level0_scale),
        geojson=cells_geojson(found, level0_scale),
        thumbnail=thumbnail,
        thumbnail_scale=thumb_scale,
    )
    return cells, scan_entry, verdict


_Prepared = tuple[Tile, qc.TileQC, np.ndarray | None]  # tile, its QC, normalised if it passed


def _prepared_tiles(
    scan: Scan,
    specs: Sequence[TileSpec],
    stains: stain.StainEstimate,
    reference: stain.StainReference | None,
    params: qc.QCParams,
    timer: StageTimer,
) -> Iterator[_Prepared]:
    """Tiles read, judged and normalised on a worker thread, up to ``PREPARED_AHEAD``
    ahead of the caller, so that this CPU work overlaps the networks' on the tiles
    before. The caller stopping early (the cell budget reached) stops the worker; a
    reader's error reaches the caller in order, as if read on its own thread."""
    ready: queue.Queue[_Prepared | BaseException | None] = queue.Queue(PREPARED_AHEAD)
    stop = threading.Event()

    def hand_over(item: _Prepared | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for tile in timer.timed(tiles.iter_tiles(scan, specs), "read"):
                with timer.stage("qc"):
                    result = qc.assess_tile(tile.spec.tile_id, tile.core, stains, params)
                normalised = None
                if result.ok:
                    with timer.stage("stain"):
                        normalised = (
                            stain.normalize(tile.image, stains, reference)
                            if reference is not None
                            else tile.image
                        )
                if not hand_over((tile, result, normalised)):
                    return
            hand_over(None)
        except BaseException as exc:  # handed to the caller, raised there
            hand_over(exc)

    worker = threading.Thread(target=work, name="tile-reader", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def _tile_cells(
    tile: Tile,
    normalised: np.ndarray,
    segmenter: Segmenter,
    stains: stain.StainEstimate,
    filters: CellFilters,
    params: qc.QCParams,
    timer: StageTimer,
) -> list[Cell]:
    """StarDist objects whose centre lies in the tile's core -> the kept cells."""
    spec, m = tile.spec, tile.spec.margin
    with timer.stage("segment"):
        detections = segmenter.detect(normalised, core=(m, m, m + spec.height, m + spec.width))
    if not len(detections):
        return []
    with timer.stage("cells"):
        return measure_cells(
            detections,
            normalised,
            stain.basophilic(normalised, stains),
            filters,
            origin=spec.origin,
            tile_id=spec.tile_id,
            background=stains.background,
            min_basophilic=params.min_basophilic,  # the QC's "no nucleus at all" level
        )


class _CellSink:
    """Kept cells are embedded in chunks as tiles yield them, and their crops spooled to
    disk, so memory holds a chunk of crops, never a slide's worth."""

    def __init__(
        self, networks: SlideNetworks, size: int, patch_px: int, spool: Path, timer: StageTimer
    ) -> None:
        self.networks, self.size, self.patch_px, self.timer = networks, size, patch_px, timer
        self.spool = spool
        self.spool_file = open(spool, "wb")  # noqa: SIM115 - closed in finish() / discard()
        self.pending: list[Cell] = []
        self.done: list[Cell] = []
        self.embeddings: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return len(self.done) + len(self.pending)

    def add(self, cells: Sequence[Cell]) -> None:
        self.pending.extend(cells)
        if len(self.pending) >= EMBED_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        with self.timer.stage("embed"):
            self.spool_file.write(np.stack([c.patch for c in self.pending]).tobytes())
            self.embeddings.append(
                self.networks.embed(encoder_patches(self.pending, self.size), progress=_ignore)
            )
        for cell in self.pending:
            cell.patch = None  # the spool holds it now
        self.done.extend(self.pending)
        self.pending = []
        self.timer.progress("embed", 1.0)

    def finish(self) -> tuple[list[Cell], np.ndarray, np.ndarray]:
        """(cells, embeddings (N, D), crops (N, s, s, 3) memory-mapped from the spool)."""
        self._flush()
        self.spool_file.close()
        shape = (len(self.done), self.patch_px, self.patch_px, 3)
        patches = np.memmap(self.spool, dtype=np.uint8, mode="r", shape=shape)
        return self.done, np.concatenate(self.embeddings), patches

    def discard(self) -> None:
        self.spool_file.close()


def _ignore(done: int, total: int) -> None:
    """Chunks are small; the sink reports progress per chunk."""
