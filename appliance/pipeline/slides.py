"""One slide up to cached embeddings and its cell table: which kind it is, and the cache.

``process_slide`` hands a slide to its path: a scan file (``pipeline.scans``: the
cellular zone, tiles best-first until the cell budget), microscope-camera photos
(``pipeline.fields``: a field folder, or a single photo, which is a JPEG / PNG / BMP
or a TIFF of one untiled image, ``readers.is_field_file``; a tiled TIFF is a scan),
or a single-cell folder (``pipeline.cell_folders``, the PB workflow: straight to the
encoder). What comes back is cached by (slide content, bundle): a case scored again
after a late slide reads it back instead (``pipeline.slide_cache``).
``pipeline.cases.score_case`` takes it from there.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from appliance.pipeline import qc, slide_cache
from appliance.pipeline.cell_folders import CELL_FOLDER_FORMAT, process_cell_folder
from appliance.pipeline.fields import process_fields
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.progress import ProgressCallback, StageTimer, no_progress
from appliance.pipeline.scans import process_scan
from appliance.pipeline.slide_cache import SlideCells
from appliance.readers import (
    Calibration,
    ScanNotFoundError,
    folder_layout,
    is_field_file,
    open_field_folder,
    scan_fingerprint,
    single_field,
)
from appliance.readers.formats import Layout
from appliance.results.schema import ScanRecord
from runtime.typed_json import dump, parse_section

_SHA256 = re.compile(r"[0-9a-f]{64}")


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
            cells, scan, verdict = process_fields(fields, networks, timer, spool)
        elif path.is_dir():
            cells, scan, verdict = process_cell_folder(path, networks, timer)
        elif is_field_file(path):
            field = single_field(path, calibration)
            cells, scan, verdict = process_fields(field, networks, timer, spool)
        else:
            cells, scan, verdict = process_scan(path, networks, timer, calibration, spool)
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    # What embedded this slide (nothing, when it had no cells), and what segmented it.
    embedded = networks.embedded > embedded_before
    segmented = scan.format != CELL_FOLDER_FORMAT
    record = scan.record(
        slide_id=slide_id,
        sha256=digest,
        qc=verdict,
        cells=len(cells.embeddings),
        encoder_variant=networks.variant if embedded else None,
        segmenter_variant=networks.segmenter_variant if segmented else None,
    )
    meta = {
        "scan": dump(record),
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
