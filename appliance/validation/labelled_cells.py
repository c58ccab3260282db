"""Labelled cells in the layouts labs already keep them, embedded by a bundle's own cell
path: what ``cytoedge train`` fits a cell head on, and what ``cytoedge validate``
measures one against (docs/cells.md, "Labelled cells: the three layouts").

- **Class folders of crops**: ``<root>/<class>/*.jpg|png|bmp|tif``, optionally one
  folder per patient or image group above them (``<root>/<group>/<class>/``). Each
  class folder is a single-cell folder to the pipeline (``process_slide``: cached,
  and embedded exactly as a single-cell folder is served).
- **Points on photos or scans**: a CSV with the columns ``image, x_px, y_px, class``
  (and optionally ``group``), or a folder of images each with a QuPath GeoJSON export
  beside it (``<image stem>.geojson``: points, or polygons counted by their centroid).
  Each image goes through ``process_slide`` (a photo is a field, a scan a scan); a
  point inside a kept cell's polygon takes that cell, any other is cropped around
  as the pipeline crops (``pipeline.point_crops``).

Labels name a class of the taxonomy by its name or its label, in any case. The
cross-validation groups: the folder above the class folders (else each crop its own
group: cross-validation by crop), the image of a point (or its ``group`` column).

Everything is read and checked before any image is processed: a malformed input
stops with ``LabelledCellsError``, one line naming the file and the row. Memory holds
one image (or one chunk of crops) at a time; the crops of every cell wait in a
memory-mapped spool.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from skimage.measure import points_in_poly

from appliance.console import counted, new_progress
from appliance.pipeline.cells import resize_bilinear
from appliance.pipeline.embedding_sink import EMBED_CHUNK
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.point_crops import PointCropper
from appliance.pipeline.slide_cache import SlideCells
from appliance.pipeline.slides import SlideResult, process_slide
from appliance.readers import ScanError
from appliance.validation.cell_layouts import (
    CLASS_FOLDERS,
    Label,
    LabelledCellsError,
    Plan,
    Point,
    layout_of,
    read_plan,
)
from appliance.validation.cohort import PipelineSettings
from runtime.taxonomy import Taxonomy

# How a cell was cut: a crop of a class folder, a point inside a kept (segmented) cell,
# or a crop around a point no kept cell holds.
CROP, SEGMENTED, AROUND_POINT = "crop", "segmented", "around_point"
HOW = (CROP, SEGMENTED, AROUND_POINT)
_WKT_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
__all__ = [
    "AROUND_POINT",
    "CROP",
    "SEGMENTED",
    "LabelledCells",
    "LabelledCellsError",
    "is_labelled_cells",
    "read_labelled_cells",
]


@dataclass(frozen=True)
class LabelledCells:
    taxonomy: Taxonomy
    labels: tuple[str, ...]  # taxonomy class name per cell
    groups: tuple[str, ...]  # patient / image per cell: the cross-validation groups
    sources: tuple[str, ...]  # "file" or "file:row" per cell
    how: tuple[str, ...]  # CROP | SEGMENTED | AROUND_POINT
    embeddings: np.ndarray  # (N, D) float32, the bundle's encoder
    patches: np.ndarray  # (N, s, s, 3) uint8: the crops as the pipeline cut them
    layout: str = CLASS_FOLDERS
    grouping: str = ""  # how the groups were chosen, a sentence
    notes: tuple[str, ...] = ()  # what a person should know about how the cells were cut

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        """Cells per class, in the taxonomy's order (classes without cells left out)."""
        counts = {name: self.labels.count(name) for name in self.taxonomy.names}
        return {name: n for name, n in counts.items() if n}

    def how_counts(self) -> dict[str, int]:
        return {how: self.how.count(how) for how in HOW if how in self.how}

    def summary(self) -> str:
        """One line: how many cells of how many classes, and how each was cut."""
        how = self.how_counts()
        parts = []
        if CROP in how:
            parts.append(f"{counted(how[CROP], 'crop')} of class folders")
        if SEGMENTED in how or AROUND_POINT in how:
            parts.append(f"{counted(how.get(SEGMENTED, 0), 'point')} matched to a segmented cell")
            parts.append(f"{how.get(AROUND_POINT, 0)} cropped around the point")
        return (
            f"{len(self)} labelled cells of {len(self.class_counts())} classes "
            f"in {len(set(self.groups))} groups: " + ", ".join(parts)
        )


def is_labelled_cells(path: Path) -> bool:
    """A class-folder root, a points CSV or a folder of images with QuPath GeoJSON files
    (a cases table, ``case_id,scans``, is not)."""
    return layout_of(path) is not None


# --- embedding -------------------------------------------------------------------------


class _Cells:
    """The output, filled row by row in the input's order: embeddings in memory, crops in
    an unlinked spool file (memory-mapped: their pages are the disk's, not the process's)."""

    def __init__(self, count: int, dim: int, side: int, spool_dir: Path) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="labelled-", suffix=".raw", dir=spool_dir)
        os.close(handle)
        try:
            shape = (count, side, side, 3)
            self.patches = np.memmap(name, dtype=np.uint8, mode="w+", shape=shape)
        finally:
            os.unlink(name)  # the mapping keeps the space until it is dropped
        self.embeddings = np.zeros((count, dim), np.float32)
        self.labels = [""] * count
        self.groups = [""] * count
        self.sources = [""] * count
        self.how = [""] * count

    def put(
        self,
        row: int,
        embedding: np.ndarray,
        patch: np.ndarray,
        label: Label,
        how: str,
    ) -> None:
        self.embeddings[row] = embedding
        self.patches[row] = patch
        self.labels[row], self.groups[row] = label.cell_class, label.group
        self.sources[row], self.how[row] = label.source, how


def read_labelled_cells(
    path: Path,
    taxonomy: Taxonomy,
    networks: SlideNetworks,
    pipeline: PipelineSettings,
    console: Console,
) -> LabelledCells:
    """The labelled cells at ``path`` (module docstring), each embedded by the bundle's
    encoder as serving would have embedded it; prints how many were matched to a
    segmented cell and how many cropped around their point."""
    path = Path(path)
    plan = read_plan(path, taxonomy)
    bundle = networks.bundle
    out = _Cells(
        plan.cells,
        bundle.encoder.embed_dim,
        bundle.cells.patch_px,
        pipeline.cache_dir / "spool",
    )
    with new_progress(console) as progress:
        if plan.folders:
            _embed_class_folders(plan, path, networks, pipeline, progress, out)
        else:
            _embed_points(plan, networks, pipeline, progress, out)
    cells = LabelledCells(
        taxonomy=taxonomy,
        labels=tuple(out.labels),
        groups=tuple(out.groups),
        sources=tuple(out.sources),
        how=tuple(out.how),
        embeddings=out.embeddings,
        patches=out.patches,
        layout=plan.layout,
        grouping=plan.grouping,
        notes=tuple(plan.notes),
    )
    console.print(f"{path}: {cells.summary()}")
    console.print(f"Cross-validation groups: {cells.grouping}")
    for note in cells.notes:
        console.print(f"[yellow]note[/yellow] {note}")
    return cells


def _processed(
    item: Path,
    networks: SlideNetworks,
    pipeline: PipelineSettings,
    progress: Progress,
) -> SlideResult:
    """``item`` through the pipeline (or from the slide cache), with a bar of its stages;
    a reader's refusal becomes one line naming it."""
    label = item.name[:24]
    current = progress.add_task(label, total=1.0)

    def report(stage: str, fraction: float) -> None:
        progress.update(current, completed=fraction, description=f"{label}: {stage}")

    try:
        return process_slide(
            item,
            networks,
            cache_dir=pipeline.cache_dir,
            calibration=pipeline.calibration,
            progress=report,
        )
    except ScanError as exc:
        raise LabelledCellsError(f"{item}: {exc.reason}") from None
    finally:
        progress.remove_task(current)


def _embed_class_folders(
    plan: Plan,
    root: Path,
    networks: SlideNetworks,
    pipeline: PipelineSettings,
    progress: Progress,
    out: _Cells,
) -> None:
    """Each class folder as the single-cell folder it is to the pipeline."""
    overall = progress.add_task(f"{len(plan.folders)} class folders", total=len(plan.folders))
    row = 0
    for folder in plan.folders:
        cells = _processed(folder.folder, networks, pipeline, progress).cells()
        for index, line in enumerate(csv.DictReader(cells.table_csv.splitlines())):
            source = (folder.folder / line["file"]).relative_to(root).as_posix()
            label = Label(folder.cell_class, folder.group or source, source)
            out.put(row, cells.embeddings[index], cells.patches[index], label, CROP)
            row += 1
        progress.advance(overall)


def _embed_points(
    plan: Plan,
    networks: SlideNetworks,
    pipeline: PipelineSettings,
    progress: Progress,
    out: _Cells,
) -> None:
    """Each image through the pipeline; its points matched to kept cells or cropped."""
    overall = progress.add_task(f"{len(plan.points)} images", total=len(plan.points))
    start = 0
    failed: dict[str, list[str]] = {}  # QC reason -> images whose points were all cropped
    unstained: dict[str, list[str]] = {}  # why not -> images cropped without normalisation
    for image, points in plan.points.items():
        slide = _processed(image, networks, pipeline, progress)
        kept = slide.cells() if slide.qc_passed and slide.n_cells else None
        cell_of = _containing_cells(kept, points)
        around = [row for row, cell in enumerate(cell_of) if cell < 0]
        for row, cell in enumerate(cell_of):
            if cell >= 0 and kept is not None:
                patch = kept.patches[cell]
                out.put(start + row, kept.embeddings[cell], patch, points[row].label, SEGMENTED)
        if around:
            with PointCropper(image, networks.bundle, pipeline.calibration) as cropper:
                for chunk in range(0, len(around), EMBED_CHUNK):
                    rows = around[chunk : chunk + EMBED_CHUNK]
                    crops = [cropper.crop(points[r].x, points[r].y) for r in rows]
                    for r, crop, embedding in zip(
                        rows, crops, _embedded(crops, networks), strict=True
                    ):
                        out.put(start + r, embedding, crop, points[r].label, AROUND_POINT)
            if cropper.stains_note:
                unstained.setdefault(cropper.stains_note, []).append(image.name)
            elif not slide.qc_passed:
                failed.setdefault(slide.qc_reason or "", []).append(image.name)
        start += len(points)
        progress.advance(overall)
    for reason, names in failed.items():
        plan.notes.append(
            f"{_images(names)} failed QC ({reason}): their points were cropped around"
        )
    for reason, names in unstained.items():
        plan.notes.append(
            f"{_images(names)}: the stains could not be estimated ({reason}); their points "
            "were cropped white-balanced but not stain-normalised"
        )


def _images(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{counted(len(names), 'image')} ({shown})"


def _embedded(crops: Sequence[np.ndarray], networks: SlideNetworks) -> np.ndarray:
    """Crops through the encoder, resized as the pipeline resizes a kept cell's crop
    (``cells.encoder_patches``)."""
    size = networks.bundle.encoder.input.fed_px
    inputs = np.stack([resize_bilinear(crop, size) for crop in crops])
    return networks.embed(inputs, progress=lambda done, total: None)


def _containing_cells(kept: SlideCells | None, points: Sequence[Point]) -> list[int]:
    """For each point, the kept cell whose polygon (the cell table's, in the image file's
    pixels) holds it, the nearest centre when several do; -1 when none does."""
    found = [-1] * len(points)
    if kept is None or not points:
        return found
    xy = np.array([[p.x, p.y] for p in points], np.float64)
    best = np.full(len(points), np.inf)
    for index, row in enumerate(csv.DictReader(kept.table_csv.splitlines())):
        ring = np.array(_WKT_NUMBER.findall(row["polygon_wkt"]), np.float64).reshape(-1, 2)
        low, high = ring.min(0), ring.max(0)
        near = np.flatnonzero(((xy >= low) & (xy <= high)).all(axis=1))
        if not len(near):
            continue
        inside = near[points_in_poly(xy[near], ring)]
        centre = np.array([float(row["x"]), float(row["y"])])
        distance = np.hypot(*(xy[inside] - centre).T)
        for point, d in zip(inside, distance, strict=True):
            if d < best[point]:
                best[point], found[point] = d, index
    return found
