"""Per-slide results cached on disk, keyed by (slide content, the bundle's slide part).

A case is re-scored when a late slide arrives; its other slides are not
processed again: their embeddings, cells and pictures come from here, so a
re-score costs only the heads. One folder per (slide fingerprint,
``Bundle.slide_sha256``: the encoder, segmenter and slide parameters, not the
heads, so that a retrained bundle reuses what its predecessor embedded) under
``<data_dir>/cache/slides/``, written under a temporary name and renamed whole,
so a crash never leaves a half entry that looks complete.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.results.schema import ExaminedRecord, ScanRecord
from runtime.files import group_readable

# 4: the scan as a typed ScanRecord (result schema 2); 5: field folders, blur judged at the
# bundle's scale, stains estimated from every stained pixel (docs/qc.md); 6: each cell's
# class probabilities from the bundle's cell head
CACHE_FORMAT = 6
THUMBNAIL_LONG_SIDE = 1024  # a slide's picture: at most this many pixels on its long side
_PATCH_CHUNK = 256  # rows copied at a time: memory stays bounded for any slide
_COPY_BYTES = 1 << 22
META_FILE = "slide.json"


@dataclass(frozen=True)
class SlideInput:
    """What a slide's path learnt about its input: result.json's ``ScanRecord`` but for
    what ``process_slide`` adds (its id, content hash, QC verdict, cells, networks)."""

    path: str
    format: str
    bytes: int
    pixel_size_um: float | None
    width: int | None = None
    height: int | None = None
    fields: int | None = None
    examined: ExaminedRecord | None = None

    def record(self, **rest: Any) -> ScanRecord:
        """The ``ScanRecord`` with ``rest`` (slide_id, sha256, qc, cells, variants)."""
        return ScanRecord(**{f.name: getattr(self, f.name) for f in fields(self)}, **rest)


@dataclass
class SlideCells:
    """Everything the heads and the result folder need from one processed slide."""

    embeddings: np.ndarray  # (N, D) float32
    xy: np.ndarray  # (N, 2) float32, cell centre (x, y) at 0.25 um/px
    cell_ids: np.ndarray  # (N,) int64, the cell table's ids
    patches: np.ndarray  # (N, s, s, 3) uint8, the crops the encoder saw (before resizing)
    table_csv: str  # cells.csv, one row per cell in the order above
    geojson: dict[str, Any]  # FeatureCollection, one feature per cell in the order above
    thumbnail: np.ndarray  # (h, w, 3) uint8
    thumbnail_scale: float  # 0.25-um pixels per thumbnail pixel
    # (N, C) float32: the cell head's mean class probabilities, uncalibrated (the case
    # applies its calibration and operating point); C = 0 without a cell head
    class_probabilities: np.ndarray

    @classmethod
    def empty(
        cls, dim: int, thumbnail: np.ndarray, scale: float, patch_px: int, classes: int = 0
    ) -> SlideCells:
        return cls(
            embeddings=np.zeros((0, dim), np.float32),
            xy=np.zeros((0, 2), np.float32),
            cell_ids=np.zeros(0, np.int64),
            patches=np.zeros((0, patch_px, patch_px, 3), np.uint8),
            table_csv="",
            geojson={"type": "FeatureCollection", "features": []},
            thumbnail=thumbnail,
            thumbnail_scale=scale,
            class_probabilities=np.zeros((0, classes), np.float32),
        )

    def classes(self) -> np.ndarray:
        """(N,) int: each cell's most probable class (-1 each without a cell head)."""
        if not self.class_probabilities.shape[1]:
            return np.full(len(self.embeddings), -1, np.int64)
        return self.class_probabilities.argmax(axis=1)

    def take(self, indices: np.ndarray) -> SlideCells:
        """The cells at ``indices`` (ascending: the order the slide was visited in),
        with their rows of the tables."""
        indices = np.asarray(indices, np.int64)
        count = len(indices)
        if np.array_equal(indices, np.arange(count)):
            if count == len(self.embeddings):
                return self
            rows: slice | np.ndarray = slice(0, count)  # a prefix keeps the crops mapped
        else:
            rows = indices
        table = io.StringIO()
        if self.table_csv:
            header, *lines = csv.reader(io.StringIO(self.table_csv))
            csv.writer(table, lineterminator="\n").writerows([header, *(lines[i] for i in indices)])
        features = list(self.geojson.get("features") or [])
        return dataclasses.replace(
            self,
            embeddings=self.embeddings[rows],
            xy=self.xy[rows],
            cell_ids=self.cell_ids[rows],
            patches=self.patches[rows],
            table_csv=table.getvalue(),
            geojson={
                **self.geojson,
                "features": [features[i] for i in indices] if features else [],
            },
            class_probabilities=self.class_probabilities[rows],
        )


def entry_dir(cache_root: Path, slide_fingerprint: str, slide_sha256: str) -> Path:
    """The entry of a slide for a bundle's ``slide_sha256``."""
    return cache_root / "slides" / f"{slide_fingerprint[:32]}-{slide_sha256[:16]}"


def read_meta(entry: Path) -> dict[str, Any] | None:
    """The entry's metadata, or None when there is no complete entry of this format."""
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("cache_format") == CACHE_FORMAT else None


def write_entry(entry: Path, meta: dict[str, Any], cells: SlideCells) -> None:
    """Write a complete entry (replacing an older one) in one rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        group_readable(staging)
        np.savez(
            staging / "cells.npz",
            embeddings=cells.embeddings,
            xy=cells.xy,
            cell_ids=cells.cell_ids,
            class_probabilities=cells.class_probabilities,
        )
        save_npy_chunked(staging / "patches.npy", cells.patches)
        (staging / "cells.csv").write_text(cells.table_csv, encoding="utf-8")
        (staging / "cells.geojson").write_text(json.dumps(cells.geojson), encoding="utf-8")
        Image.fromarray(cells.thumbnail).save(staging / "thumbnail.png")
        meta = {**meta, "cache_format": CACHE_FORMAT, "thumbnail_scale": cells.thumbnail_scale}
        (staging / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_npy_chunked(path: Path, array: np.ndarray) -> None:
    """``np.save`` that copies ``array`` a few rows at a time; a file-backed memmap
    (the pipeline's spool of crops) is copied with plain reads: reading through
    the mapping would keep every page of it resident, and a 40,000 px slide's
    crops are over a gigabyte."""
    with open(path, "wb") as handle:
        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": array.shape})
        if isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous:
            with open(array.filename, "rb") as source:
                source.seek(array.offset)
                left = array.nbytes
                while left:
                    chunk = source.read(min(left, _COPY_BYTES))
                    if not chunk:
                        raise OSError(f"{array.filename}: shorter than its {array.nbytes} bytes")
                    handle.write(chunk)
                    left -= len(chunk)
            return
        for start in range(0, len(array), _PATCH_CHUNK):
            handle.write(np.ascontiguousarray(array[start : start + _PATCH_CHUNK]).tobytes())


def read_cells(entry: Path) -> SlideCells:
    meta = read_meta(entry)
    if meta is None:
        raise FileNotFoundError(f"{entry}: no complete cache entry")
    with np.load(entry / "cells.npz") as arrays:
        loaded = {k: arrays[k] for k in arrays.files}
    # Memory-mapped: a case reads the crops of its top cells only.
    loaded["patches"] = np.load(entry / "patches.npy", mmap_mode="r")
    with Image.open(entry / "thumbnail.png") as image:
        thumbnail = np.asarray(image.convert("RGB"))
    return SlideCells(
        embeddings=loaded["embeddings"],
        xy=loaded["xy"],
        cell_ids=loaded["cell_ids"],
        patches=loaded["patches"],
        table_csv=(entry / "cells.csv").read_text(encoding="utf-8"),
        geojson=json.loads((entry / "cells.geojson").read_text(encoding="utf-8")),
        thumbnail=thumbnail,
        thumbnail_scale=float(meta["thumbnail_scale"]),
        class_probabilities=loaded["class_probabilities"],
    )
