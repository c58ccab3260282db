"""A folder of single-cell crops (the PB workflow): the crops are the cells, so there is
no segmentation and no tile QC; they go straight to the encoder."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.pipeline.cells import resize_bilinear
from appliance.pipeline.embedding_sink import EMBED_CHUNK
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.progress import StageTimer
from appliance.pipeline.slide_cache import SlideCells, SlideInput
from appliance.readers import open_cell_folder
from appliance.results.schema import QcRecord

MOSAIC_CELL_PX = 32  # a cell folder's "thumbnail": its cells in a grid, this size each
CELL_FOLDER_FORMAT = "cells"  # a single-cell folder's ScanRecord.format


def process_cell_folder(
    path: Path, networks: SlideNetworks, timer: StageTimer
) -> tuple[SlideCells, SlideInput, QcRecord]:
    """The folder's crops embedded -> (cells, what the folder is, a passed QC)."""
    bundle = networks.bundle
    size = bundle.encoder.input.fed_px
    patch_px = bundle.cells.patch_px
    with timer.stage("read"):
        folder = open_cell_folder(path)
    names = [p.name for p in folder.image_paths]
    crops: list[np.ndarray] = []
    embedded: list[np.ndarray] = []
    # A chunk at a time: memory holds one chunk's encoder inputs, whatever the folder's size.
    for start in range(0, len(folder), EMBED_CHUNK):
        inputs = []
        with timer.stage("read"):
            for index in range(start, min(start + EMBED_CHUNK, len(folder))):
                image = folder.read(index)
                crops.append(resize_bilinear(image, patch_px))
                inputs.append(resize_bilinear(image, size))
                timer.progress("read", (index + 1) / len(folder))
        with timer.stage("embed"):
            embedded.append(networks.embed(np.stack(inputs), progress=_per_chunk))
        timer.progress("embed", len(crops) / len(folder))
    embeddings = np.concatenate(embedded)
    with timer.stage("classify"):
        probabilities = networks.classify(embeddings)
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
        class_probabilities=probabilities,
    )
    scan = SlideInput(
        path=str(path),
        format=CELL_FOLDER_FORMAT,
        bytes=sum(p.stat().st_size for p in folder.image_paths),
        pixel_size_um=folder.pixel_size_um,
    )
    return cells, scan, QcRecord(verdict="pass")


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


def _per_chunk(done: int, total: int) -> None:
    """The folder reports progress per chunk."""
