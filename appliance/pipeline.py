"""From scan files to a scored case: the two calls the service and ``cytoedge score`` make.

``process_slide`` takes one scan (or a single-cell folder) up to cached
embeddings and its cell table; ``score_case`` runs the heads over the union of
a case's slides' cells and writes the next version of the case's result folder.
Per-slide work is cached by (slide content, bundle), so re-scoring a case
after a late slide costs only the heads.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from appliance import slide_cache
from appliance.cells import (
    Cell,
    CellFilters,
    cells_csv,
    cells_geojson,
    csv_with_attention,
    encoder_patches,
    geojson_with_attention,
    measure_cells,
    resize_bilinear,
)
from appliance.readers import ScanNotFoundError, open_cell_folder, open_scan, scan_fingerprint
from appliance.results import (
    GALLERY_CELLS,
    CaseOutputs,
    ResultFolder,
    SlideOutputs,
    write_case_result,
)
from appliance.scoring import abstain_reason, top_attention_mass
from appliance.slide_cache import SlideCells
from runtime.bundle import Bundle
from runtime.heads import HeadResult, load_heads

ProgressCallback = Callable[[str, float], None]
T = TypeVar("T")
TOP_CELLS = 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)


def no_progress(stage: str, fraction: float) -> None:
    """The default progress callback: ignore."""


class StageTimer:
    """Seconds spent per stage, summed over tiles; reports progress as it goes."""

    def __init__(self, progress: ProgressCallback) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str) -> Any:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def timed(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """Yield from ``items``, counting the time spent producing each as ``stage``."""
        iterator = iter(items)
        while True:
            with self.stage(stage):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


@dataclass
class SlideResult:
    """One processed scan: what result.json says about it, and where its cells are cached."""

    slide_id: str
    path: Path
    fingerprint: str
    scan: dict[str, Any]  # result.json's scans[] entry
    qc_passed: bool
    qc_reason: str | None
    n_cells: int
    cache_entry: Path
    timings_s: dict[str, float]
    backend: str
    from_cache: bool = False

    def cells(self) -> SlideCells:
        return slide_cache.read_cells(self.cache_entry)


@dataclass
class CaseResult:
    case_id: str
    status: str  # scored | abstained
    abstain_reason: str | None
    folder: ResultFolder
    result: dict[str, Any]
    slides: list[SlideResult] = field(default_factory=list)

    @property
    def version(self) -> int:
        return self.folder.version


# --- case scoring ------------------------------------------------------------------


def score_case(
    case_id: str,
    slides: Sequence[SlideResult],
    bundle: Bundle,
    outbox: Path,
    *,
    backend: str = "auto",
    threads: int = 0,
    progress: ProgressCallback = no_progress,
    write_pdf: bool = True,
) -> CaseResult:
    """Run the bundle's heads over all cells of the case's slides; write version N+1."""
    if not slides:
        raise ValueError("a case needs at least one slide")
    timer = StageTimer(progress)
    progress("heads", 0.0)
    with timer.stage("load cells"):
        passed = [s for s in slides if s.qc_passed]
        cells = {s.slide_id: s.cells() for s in passed}
    qc_failures = [f"{s.slide_id}: {s.qc_reason}" for s in slides if not s.qc_passed]
    n_cells = sum(len(c.embeddings) for c in cells.values())
    min_cells = bundle.cells.min_cells

    head_results: list[HeadResult] = []
    attention = np.zeros(n_cells, np.float32)
    backend_used = slides[0].backend
    if n_cells >= min_cells and len(qc_failures) < len(slides):
        bag = np.concatenate([c.embeddings for c in cells.values()])
        with timer.stage("heads"):
            runners = load_heads(bundle, backend, threads)
            try:
                head_results = [runner.predict(bag) for runner in runners.values()]
                backend_used = next(iter(runners.values())).backend_name
            finally:
                for runner in runners.values():
                    runner.close()
        attention = np.mean([h.attention for h in head_results], axis=0).astype(np.float32)
    progress("heads", 1.0)

    predictions = [
        {"head": h.head, **_prediction_dict(p)} for h in head_results for p in h.predictions
    ]
    reason = abstain_reason(n_cells, min_cells, qc_failures, len(slides), predictions)
    status = "abstained" if reason else "scored"
    result = _result_json(case_id, slides, bundle, backend_used, status, reason, predictions)
    result["high_risk"] = next((h.high_risk for h in head_results if h.high_risk), None)
    pb = next((h for h in head_results if h.malignancy_probability is not None), None)
    result["malignancy_probability"] = pb.malignancy_probability if pb else None
    result["top2"] = [{"class": c, "probability": p} for c, p in pb.top2] if pb else None
    result["attention_top20_mass"] = top_attention_mass(attention) if n_cells else None
    result["heads"] = [
        {"name": h.head, "kind": h.kind, "probabilities": h.probabilities} for h in head_results
    ]

    outputs = _case_outputs(result, passed, cells, attention, bool(head_results))
    progress("write", 0.0)
    with timer.stage("write"):
        result["timings_s"] = {**_slide_timings(slides), **timer.rounded()}
        folder = write_case_result(outbox, case_id, outputs, write_pdf=write_pdf)
    progress("write", 1.0)
    log.info(
        "case %s scored: %s (version %d)",
        case_id,
        status if not reason else f"abstained: {reason}",
        folder.version,
        extra={"case": case_id, "status": status, "cells": n_cells},
    )
    return CaseResult(case_id, status, reason, folder, result, list(slides))


def _prediction_dict(prediction: Any) -> dict[str, Any]:
    return {
        "task": prediction.task,
        "label": prediction.label,
        "probability": float(prediction.probability),
        "threshold": float(prediction.threshold),
        "call": prediction.call,
    }


def _slide_timings(slides: Sequence[SlideResult]) -> dict[str, float]:
    total: dict[str, float] = {}
    for slide in slides:
        for stage, seconds in slide.timings_s.items():
            total[stage] = round(total.get(stage, 0.0) + seconds, 3)
    return total


def _result_json(
    case_id: str,
    slides: Sequence[SlideResult],
    bundle: Bundle,
    backend: str,
    status: str,
    reason: str | None,
    predictions: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "status": status,
        "abstain_reason": reason,
        "scans": [s.scan for s in slides],
        "bundle": {
            "name": bundle.name,
            "version": bundle.version,
            "sha256": bundle.sha256,
            "intended_use": bundle.intended_use,
        },
        "backend": backend,
        "predictions": predictions,
    }


def _case_outputs(
    result: dict[str, Any],
    slides: Sequence[SlideResult],
    cells: dict[str, SlideCells],
    attention: np.ndarray,
    scored: bool,
) -> CaseOutputs:
    """Per-slide pictures and tables with the attention of each cell, and the gallery."""
    slide_outputs, offsets, start = [], {}, 0
    for slide in slides:
        c = cells[slide.slide_id]
        n = len(c.embeddings)
        offsets[slide.slide_id] = start
        share = attention[start : start + n]
        slide_outputs.append(
            SlideOutputs(
                slide_id=slide.slide_id,
                thumbnail=c.thumbnail,
                thumbnail_scale=c.thumbnail_scale,
                cell_xy=c.xy,
                attention=share,
                cells_csv=csv_with_attention(c.table_csv, share if scored else None),
                geojson=geojson_with_attention(
                    c.geojson, slide.slide_id, share if scored else None
                ),
            )
        )
        start += n
    gallery, captions, top_cells = [], [], []
    if scored and len(attention):
        order = np.argsort(-attention)[:TOP_CELLS]
        owners = [(s.slide_id, offsets[s.slide_id], cells[s.slide_id]) for s in slides]
        for rank, index in enumerate(order, start=1):
            slide_id, offset, c = next(o for o in owners if o[1] <= index < o[1] + len(o[2].xy))
            local = int(index - offset)
            x, y = (float(v) for v in c.xy[local])
            top_cells.append(
                {
                    "slide": slide_id,
                    "cell_id": int(c.cell_ids[local]),
                    "x": x,
                    "y": y,
                    "attention": float(attention[index]),
                    "image": f"top_cells/{rank:02d}.png",
                }
            )
            gallery.append(c.patches[local])
            captions.append(
                f"#{rank} a={attention[index]:.4f}\n{slide_id[:14]} cell {c.cell_ids[local]}"
            )
    result["top_cells"] = top_cells
    embeddings: dict[str, np.ndarray] = {}
    if cells:
        embeddings = {
            "embeddings": np.concatenate([cells[s.slide_id].embeddings for s in slides]),
            "attention": attention,
            "slide": np.array([s.slide_id for s in slides for _ in cells[s.slide_id].cell_ids]),
            "cell_id": np.concatenate([cells[s.slide_id].cell_ids for s in slides]),
            "xy": np.concatenate([cells[s.slide_id].xy for s in slides]),
        }
    return CaseOutputs(
        result=result,
        slides=slide_outputs,
        gallery_patches=gallery[:GALLERY_CELLS],
        gallery_captions=captions[:GALLERY_CELLS],
        embeddings=embeddings,
    )


# --- slides ------------------------------------------------------------------------


def process_slide(
    path: Path | str,
    bundle: Bundle,
    *,
    cache_dir: Path,
    backend: str = "auto",
    threads: int = 0,
    batch_size: int = 0,
    pixel_size_um: float = 0.0,
    slide_id: str | None = None,
    progress: ProgressCallback = no_progress,
    fingerprint: str | None = None,
    networks: SlideNetworks | None = None,
) -> SlideResult:
    """One scan (or single-cell folder) up to cached embeddings and its cell table.

    ``fingerprint``: the sha256 of the scan's content when the caller already has
    it (the service hashes a scan when it arrives); computed here otherwise.
    ``networks``: ``SlideNetworks`` of ``bundle`` shared by the caller's slides
    (one encoder and one segmenter session for all of them); without it, this
    slide opens the ones it needs and closes them. ``backend``, ``threads`` and
    ``batch_size`` are then the shared networks'.

    Raises ``appliance.readers.ScanError`` (with a one-line ``reason``) for an
    input that cannot be used. A slide that fails QC is not an error: it comes
    back with ``qc_passed`` False and no cells.
    """
    path = Path(path)
    slide_id = slide_id or (path.stem if path.is_file() else path.name) or "slide"
    if fingerprint is not None and not _SHA256.fullmatch(fingerprint):
        raise ValueError(f"fingerprint must be a sha256 in lower-case hex, got {fingerprint!r}")
    if networks is not None and networks.bundle.sha256 != bundle.sha256:
        raise ValueError(f"the shared networks are {networks.bundle.name}'s, not {bundle.name}'s")
    timer = StageTimer(progress)
    progress("fingerprint", 0.0)
    with timer.stage("fingerprint"):
        if not path.exists():
            raise ScanNotFoundError(path, "file not found: it was moved or deleted")
        if fingerprint is None:
            fingerprint = scan_fingerprint(path)
        digest = fingerprint
    progress("fingerprint", 1.0)
    entry = slide_cache.entry_dir(cache_dir, digest, bundle.sha256)
    meta = slide_cache.read_meta(entry)
    if meta is not None:
        progress("cached", 1.0)
        return _slide_result(meta, slide_id, path, entry, from_cache=True)

    own_networks = networks is None
    nets = SlideNetworks(bundle, backend, threads, batch_size) if own_networks else networks
    embedded_before = nets.embedded
    spool = cache_dir / "spool" / f"{digest[:16]}-{os.getpid()}-{threading.get_ident()}.raw"
    spool.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.is_dir():
            cells, scan, verdict = _cell_folder(path, bundle, nets, timer)
        else:
            cells, scan, verdict = _scan_file(path, bundle, nets, timer, pixel_size_um, spool)
        # What embedded this slide (nothing, when it had no cells).
        embedded = nets.embedded > embedded_before
        backend_used = nets.backend_name if embedded else ""
        variant = nets.variant if embedded else None
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    finally:
        if own_networks:
            nets.close()
    scan = {
        **scan,
        "slide_id": slide_id,
        "sha256": digest,
        "qc": verdict,
        "cells": len(cells.embeddings),
        "encoder_variant": variant,
    }
    meta = {
        "scan": scan,
        "qc_passed": verdict["verdict"] != "fail",  # a warning is shown, not fatal
        "qc_reason": "; ".join(verdict.get("reasons") or []) or None,
        "n_cells": len(cells.embeddings),
        "timings_s": timer.rounded(),
        "backend": backend_used,
    }
    try:
        slide_cache.write_entry(entry, meta, cells)
    finally:
        spool.unlink(missing_ok=True)
    return _slide_result(slide_cache.read_meta(entry) or meta, slide_id, path, entry)


class SlideNetworks:
    """The bundle's encoder and segmenter, each opened on first use and kept for
    every slide after that.

    A caller that processes several slides makes one, passes it to each
    ``process_slide`` and closes it at the end (or uses ``with``): one session
    of each network instead of one per slide. Lazy: a slide read from the cache
    opens neither, a single-cell folder never opens the segmenter, and a slide
    without cells never opens the encoder.
    """

    def __init__(
        self, bundle: Bundle, backend: str = "auto", threads: int = 0, batch_size: int = 0
    ) -> None:
        self.bundle = bundle
        self._args = (bundle, backend, threads, batch_size)
        self._encoder: Any = None
        self._segmenter: Any = None
        self.embedded = 0  # images embedded so far, over all slides

    def __enter__(self) -> SlideNetworks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, patches: np.ndarray, progress: Callable[[int, int], None]) -> np.ndarray:
        if self._encoder is None:
            from runtime.encoder import Encoder

            self._encoder = Encoder(*self._args)
        embeddings = self._encoder.embed(patches, progress=progress)
        self.embedded += len(patches)
        return embeddings

    def segmenter(self) -> Any:
        """The bundle's ``appliance.segmentation.Segmenter``."""
        if self._segmenter is None:
            from appliance.segmentation import Segmenter

            bundle, _, threads, _ = self._args
            if bundle.segmenter is None:
                raise ValueError(
                    f"bundle {bundle.name} has no segmenter: it scores cell folders only"
                )
            # Always "auto": engines are built for the encoder and heads only, so a
            # configured "tensorrt" could not load the segmenter.
            self._segmenter = Segmenter.open(bundle.path, bundle.segmenter, "auto", threads)
        return self._segmenter

    @property
    def is_open(self) -> bool:
        """Whether the encoder session is open."""
        return self._encoder is not None

    @property
    def backend_name(self) -> str:
        return self._encoder.backend_name if self._encoder is not None else ""

    @property
    def variant(self) -> str | None:
        return self._encoder.variant if self._encoder is not None else None

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
        if self._segmenter is not None:
            self._segmenter.network.close()
            self._segmenter = None


def _slide_result(
    meta: dict[str, Any], slide_id: str, path: Path, entry: Path, *, from_cache: bool = False
) -> SlideResult:
    scan = {**meta["scan"], "slide_id": slide_id, "path": str(path)}
    return SlideResult(
        slide_id=slide_id,
        path=path,
        fingerprint=scan["sha256"],
        scan=scan,
        qc_passed=bool(meta["qc_passed"]),
        qc_reason=meta.get("qc_reason"),
        n_cells=int(meta["n_cells"]),
        cache_entry=entry,
        timings_s=dict(meta["timings_s"]) if not from_cache else {},
        backend=str(meta.get("backend", "")),
        from_cache=from_cache,
    )


MOSAIC_CELL_PX = 32


def _cell_folder(
    path: Path, bundle: Bundle, networks: SlideNetworks, timer: StageTimer
) -> tuple[SlideCells, dict[str, Any], dict[str, Any]]:
    """PB workflow: the folder's crops are the cells; no segmentation, no tile QC."""
    from PIL import Image

    size = bundle.encoder.input.size
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
    n = len(names)
    columns = max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, -(-n // columns))
    mosaic = np.full((rows * MOSAIC_CELL_PX, columns * MOSAIC_CELL_PX, 3), 255, np.uint8)
    xy = np.zeros((n, 2), np.float32)
    for index, crop in enumerate(crops):
        r, c = divmod(index, columns)
        small = Image.fromarray(crop).resize((MOSAIC_CELL_PX, MOSAIC_CELL_PX))
        y0, x0 = r * MOSAIC_CELL_PX, c * MOSAIC_CELL_PX
        mosaic[y0 : y0 + MOSAIC_CELL_PX, x0 : x0 + MOSAIC_CELL_PX] = np.asarray(small)
        xy[index] = ((c + 0.5) * MOSAIC_CELL_PX, (r + 0.5) * MOSAIC_CELL_PX)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["cell_id", "file", "x", "y"])
    for index, name in enumerate(names):
        writer.writerow([index, name, f"{xy[index, 0]:.1f}", f"{xy[index, 1]:.1f}"])
    cells = SlideCells(
        embeddings=embeddings,
        xy=xy,
        cell_ids=np.arange(n, dtype=np.int64),
        patches=np.stack(crops) if crops else np.zeros((0, patch_px, patch_px, 3), np.uint8),
        table_csv=table.getvalue(),
        geojson={"type": "FeatureCollection", "features": []},
        thumbnail=mosaic,
        thumbnail_scale=1.0,
    )
    scan = {
        "path": str(path),
        "format": "cells",
        "bytes": sum(p.stat().st_size for p in folder.image_paths),
        "pixel_size_um": folder.pixel_size_um,
    }
    verdict = {"verdict": "pass", "reasons": [], "fractions": {}}
    return cells, scan, verdict


THUMBNAIL_LONG_SIDE = 1024
STAIN_SAMPLE_TILES = 8


def _scan_file(
    path: Path,
    bundle: Bundle,
    networks: SlideNetworks,
    timer: StageTimer,
    pixel_size_um: float,
    spool: Path,
) -> tuple[SlideCells, dict[str, Any], dict[str, Any]]:
    """Reader -> cellular zone -> stains -> per tile QC, normalisation, StarDist, cells."""
    from appliance import qc, stain, tiles

    reference = _stain_reference(bundle)
    params = qc.QCParams.from_bundle(_qc_section(bundle), reference)
    size = bundle.encoder.input.size
    # Tiles are on the 0.25 um/px working grid, whatever the scan's own pixel size.
    filters = CellFilters.from_section(bundle.cells).at(tiles.TARGET_UM_PER_PX)
    patch_px = filters.patch_px
    timer.progress("read", 0.0)
    with open_scan(path, pixel_size_um) as scan:
        opened = time.perf_counter()
        info = scan.info()
        scan_entry = {
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
        specs = tiles.tile_grid(scan, zone)
        timer.seconds["read"] = time.perf_counter() - opened
        timer.progress("read", 1.0)
        empty = SlideCells.empty(bundle.encoder.embed_dim, thumbnail, thumb_scale, patch_px)
        if not specs:
            return empty, scan_entry, qc.slide_verdict([], params).to_dict()
        with timer.stage("stain"):
            sample = [
                t.core
                for t in tiles.iter_tiles(scan, tiles.sample_specs(specs, STAIN_SAMPLE_TILES))
            ]
            try:
                stains = stain.estimate_stains(sample)
            except stain.StainError as exc:
                verdict = {"verdict": "fail", "reasons": [exc.reason], "fractions": {}}
                return empty, scan_entry, verdict
        segmenter = networks.segmenter()
        # Nuclei are found on normalised tiles, whose stains are the reference's.
        nuclei_stains = reference.estimate if reference is not None else stains
        tile_qcs = []
        sink = _CellSink(networks, size, patch_px, spool, timer)
        for index, tile in enumerate(timer.timed(tiles.iter_tiles(scan, specs), "read")):
            with timer.stage("qc"):
                result = qc.assess_tile(tile.spec.tile_id, tile.core, stains, params)
                tile_qcs.append(result)
            if result.ok:
                with timer.stage("stain"):
                    normalised = (
                        stain.normalize(tile.image, stains, reference)
                        if reference is not None
                        else tile.image
                    )
                sink.add(
                    _tile_cells(tile, normalised, segmenter, nuclei_stains, filters, params, timer)
                )
            timer.progress("segment", (index + 1) / len(specs))
        verdict = qc.slide_verdict(tile_qcs, params).to_dict()
    if verdict["verdict"] == "fail" or not sink.count:
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


def _tile_cells(
    tile: Any,
    normalised: np.ndarray,
    segmenter: Any,
    stains: Any,
    filters: CellFilters,
    params: Any,
    timer: StageTimer,
) -> list[Cell]:
    """StarDist objects whose centre lies in the tile's core -> the kept cells."""
    from appliance import stain

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


EMBED_CHUNK = 256


class _CellSink:
    """Kept cells are embedded in chunks as tiles yield them, and their crops spooled to
    disk, so memory holds a chunk of crops, never a slide's worth."""

    def __init__(
        self, encoder: Any, size: int, patch_px: int, spool: Path, timer: StageTimer
    ) -> None:
        self.encoder, self.size, self.patch_px, self.timer = encoder, size, patch_px, timer
        self.spool = spool
        self.spool_file = open(spool, "wb")  # noqa: SIM115 - closed in finish()
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
                self.encoder.embed(encoder_patches(self.pending, self.size), progress=_ignore)
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


def _ignore(done: int, total: int) -> None:
    """Chunks are small; the sink reports progress per chunk."""


def _stain_reference(bundle: Bundle) -> Any:
    """The bundle's Macenko reference as appliance.stain takes it (None: no normalisation)."""
    from appliance import stain

    ref = bundle.stain_reference
    if ref is None:
        return None
    return stain.StainReference.from_dict(
        {
            "stain_matrix": ref.stain_matrix,
            "max_concentrations": ref.max_concentrations,
            "intensity_p5": ref.intensity_p5,
            "intensity_p95": ref.intensity_p95,
            **({"background": ref.extra["background"]} if "background" in ref.extra else {}),
        }
    )


def _qc_section(bundle: Bundle) -> dict[str, Any]:
    section = bundle.qc
    return {
        "laplacian_min": section.laplacian_min,
        "min_nuclei_per_tile": section.min_nuclei_per_tile,
        "max_artefact_fraction": section.max_artefact_fraction,
        **section.extra,
    }
