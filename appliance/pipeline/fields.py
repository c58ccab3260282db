"""Microscope-camera fields (a folder of photos of one smear, or one photo) up to kept cells.

The technician chose the fields, so there is no cellular-zone detection. One slide:

1. every photo is read at the 0.25 um/px working grid (``appliance.readers.open_scan``
   with the folder's calibration), how it was taken is measured (``qc.exposure``:
   glass colour, burnt-out share), it is white-balanced from its own glass to the
   bundle reference's glass colour and laid on the slide's contact sheet;
2. the stains are estimated once over all balanced fields (Macenko, as for scans);
3. per field: QC (blur, staining intensity, exposure, colour cast; nuclei counted),
   then, for a field that passed, stain normalisation, StarDist over the whole field
   (in ``tiles.TILE_PX`` windows with ``tiles.DEFAULT_MARGIN_PX`` margins when it is
   larger; ``pipeline.cell_finding.cells_in_window``, as for a scan's tiles), and the
   same cell filters and patches as scans (``appliance.pipeline.cells``), embedded
   through the same sink (``pipeline.embedding_sink``);
4. the slide's verdict over its fields (``qc.slide_verdict(..., unit="fields")``:
   cellularity per area, never per field).

Photos are read twice (steps 1 and 3) rather than held: memory holds one field.

Coordinates: cells are measured in their field's working grid. ``SlideCells.xy``
are on the contact sheet (the fields in a grid at 0.25 um/px, ``SHEET_GAP_PX``
apart, row-major in field order; one photo alone is its own sheet), so the
heatmap lies over the sheet's thumbnail, which shows the kept cells outlined and
fields that failed QC framed in red. The cell tables give each cell in the pixels
of the photo it is on, with that photo's name (``field``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from appliance.pipeline import qc, stain, tiles
from appliance.pipeline.cell_finding import SlideParams, cells_in_window, thumbnail_grid
from appliance.pipeline.cells import Cell, cells_csv, cells_geojson
from appliance.pipeline.embedding_sink import CellSink
from appliance.pipeline.networks import SlideNetworks
from appliance.pipeline.progress import StageTimer
from appliance.pipeline.segmentation import Segmenter
from appliance.pipeline.slide_cache import SlideCells, SlideInput
from appliance.readers import FieldFolder, open_scan
from appliance.results.schema import QcRecord
from runtime.bundle_format import StainReference

SHEET_GAP_PX = 16  # between fields on the contact sheet, at 0.25 um/px (4 um)
STAIN_PIXELS_PER_FIELD = 20_000
NEUTRAL_GLASS = (240.0, 240.0, 240.0)  # white balance target without a stain reference
OUTLINE_RGB = (0, 150, 60)
FAILED_FRAME_RGB = (200, 0, 30)


@dataclass(frozen=True)
class FieldInfo:
    """What the first look at a photo learnt."""

    format: str
    pixel_size_um: float  # the photo's own (x), for its cell table
    width: int  # at the working grid
    height: int
    taken: qc.Exposure


@dataclass(frozen=True)
class ContactSheet:
    """Where each field lies on the slide's sheet, in working-grid pixels."""

    origins: tuple[tuple[int, int], ...]
    width: int
    height: int

    @classmethod
    def of(cls, sizes: Sequence[tuple[int, int]]) -> ContactSheet:
        """Fields in a near-square grid, row-major, each in a cell of the largest's size."""
        columns = max(1, math.ceil(math.sqrt(len(sizes))))
        rows = max(1, -(-len(sizes) // columns))
        gap = SHEET_GAP_PX if len(sizes) > 1 else 0
        cell_w = max(w for w, _ in sizes) + gap
        cell_h = max(h for _, h in sizes) + gap
        origins = tuple(
            ((index % columns) * cell_w, (index // columns) * cell_h) for index in range(len(sizes))
        )
        return cls(origins, columns * cell_w - gap, rows * cell_h - gap)


def white_balanced(rgb: np.ndarray, glass: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """``rgb`` with its glass brought to ``target`` channel by channel (the camera's cast gone)."""
    gain = np.asarray(target, np.float32) / np.maximum(np.asarray(glass, np.float32), 1.0)
    return np.clip(rgb.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


def survey(
    folder: FieldFolder, target: Sequence[float], timer: StageTimer | None = None
) -> tuple[list[FieldInfo], list[np.ndarray]]:
    """Pass 1: each photo's size and exposure, and balanced pixels to estimate stains from."""
    timer = timer or StageTimer()
    fields: list[FieldInfo] = []
    samples: list[np.ndarray] = []
    rng = np.random.default_rng(0)
    for index in range(len(folder)):
        with timer.stage("read"):
            rgb, field = read_field(folder, index)
            pixels = white_balanced(rgb, field.taken.glass, target).reshape(-1, 3)
        fields.append(field)
        if len(pixels) > STAIN_PIXELS_PER_FIELD:
            pixels = pixels[rng.choice(len(pixels), STAIN_PIXELS_PER_FIELD, replace=False)]
        samples.append(pixels[None])
        timer.progress("read", (index + 1) / len(folder))
    return fields, samples


def judged(
    folder: FieldFolder,
    fields: Sequence[FieldInfo],
    target: Sequence[float],
    stains: stain.StainEstimate,
    params: qc.QCParams,
    timer: StageTimer | None = None,
) -> Iterator[tuple[np.ndarray, qc.TileQC]]:
    """Pass 2: each field again, white-balanced at the working grid, with its QC."""
    timer = timer or StageTimer()
    for index, field in enumerate(fields):
        with timer.stage("read"):
            rgb, _ = read_field(folder, index)
            balanced = white_balanced(rgb, field.taken.glass, target)
        with timer.stage("qc"):
            result = qc.assess_field(index, balanced, field.taken, stains, params)
        yield balanced, result


def glass_target(reference: StainReference | None) -> tuple[float, float, float]:
    """The colour every field's glass is balanced to: the reference's glass."""
    if reference is None:
        return NEUTRAL_GLASS
    r, g, b = (float(v) for v in stain.reference_stains(reference).background)
    return r, g, b


def judge(folder: FieldFolder, params: qc.QCParams, reference: StainReference | None) -> qc.SlideQC:
    """The QC verdict of a field folder alone (no segmentation): what the pipeline decides."""
    target = glass_target(reference)
    fields, samples = survey(folder, target)
    try:
        stains = stain.estimate_stains(samples)
    except stain.StainError as exc:
        return qc.SlideQC(qc.FAIL, [exc.reason], {}, 0)
    results = [result for _, result in judged(folder, fields, target, stains, params)]
    return qc.slide_verdict(results, params, unit="fields")


def process_fields(
    folder: FieldFolder, networks: SlideNetworks, timer: StageTimer, spool: Path
) -> tuple[SlideCells, SlideInput, QcRecord]:
    """One smear's field photos -> (cells, what they are, QC verdict); see the module.
    ``spool``: where the kept cells' crops wait (``pipeline.embedding_sink``)."""
    bundle = networks.bundle
    params = SlideParams.of(bundle)
    target = glass_target(params.reference)
    n = len(folder)

    # 1. read, measure exposure, balance, sample for the stains, lay out the sheet
    timer.progress("read", 0.0)
    fields, samples = survey(folder, target, timer)
    sheet = ContactSheet.of([(f.width, f.height) for f in fields])
    _, thumb_scale = thumbnail_grid(sheet.width, sheet.height)
    thumbnail = np.full(
        (max(1, round(sheet.height / thumb_scale)), max(1, round(sheet.width / thumb_scale)), 3),
        255,
        np.uint8,
    )
    scan_entry = SlideInput(
        path=str(folder.path),
        format="fields:" + "+".join(sorted({f.format for f in fields})),
        bytes=sum(p.stat().st_size for p in folder.fields),
        pixel_size_um=fields[0].pixel_size_um,
        width=sheet.width,
        height=sheet.height,
        fields=n,
    )

    def empty() -> SlideCells:
        return SlideCells.empty(
            bundle.encoder.embed_dim,
            thumbnail,
            thumb_scale,
            params.filters.patch_px,
            len(bundle.cell_classes),
        )

    # 2. stains once over the slide's fields
    with timer.stage("stain"):
        try:
            stains = stain.estimate_stains(samples)
        except stain.StainError as exc:
            _paste_all(thumbnail, folder, fields, sheet, thumb_scale, target)
            return empty(), scan_entry, QcRecord(verdict=qc.FAIL, reasons=(exc.reason,))
    nuclei_stains = params.nuclei_stains(stains)

    # 3. per field: QC, then normalisation, segmentation and cells
    segmenter: Segmenter | None = None
    results: list[qc.TileQC] = []
    owners: list[int] = []
    sink = CellSink(networks, params.filters.patch_px, spool, timer)
    for index, (balanced, result) in enumerate(
        judged(folder, fields, target, stains, params.qc, timer)
    ):
        results.append(result)
        _paste(thumbnail, balanced, sheet.origins[index], thumb_scale)
        if result.ok:
            with timer.stage("stain"):
                normalised = params.normalised(balanced, stains)
            segmenter = segmenter or networks.segmenter()
            found = _field_cells(index, normalised, segmenter, nuclei_stains, params, timer)
            owners.extend([index] * len(found))
            sink.add(found)
        timer.progress("segment", (index + 1) / n)
    verdict = qc.slide_verdict(results, params.qc, unit="fields").record()
    _frame_failed(thumbnail, results, fields, sheet, thumb_scale)
    if verdict.verdict == qc.FAIL or not sink.count:
        sink.discard()
        return empty(), scan_entry, verdict

    # 4. the slide's cells: sheet coordinates, tables in each photo's pixels
    kept, embeddings, probabilities, patches = sink.finish()
    origins = np.array([sheet.origins[i] for i in owners], np.float32)
    in_photos = [c.at(fields[i].pixel_size_um) for c, i in zip(kept, owners, strict=True)]
    names = [folder.name(i) for i in owners]
    _outline(thumbnail, kept, origins, thumb_scale)
    cells = SlideCells(
        embeddings=embeddings,
        xy=np.array([[c.x, c.y] for c in kept], np.float32) + origins,
        cell_ids=np.arange(len(kept), dtype=np.int64),
        patches=patches,
        table_csv=cells_csv(in_photos, fields=names),
        geojson=cells_geojson(in_photos, fields=names),
        thumbnail=thumbnail,
        thumbnail_scale=thumb_scale,
        class_probabilities=probabilities,
    )
    return cells, scan_entry, verdict


def read_field(folder: FieldFolder, index: int) -> tuple[np.ndarray, FieldInfo]:
    """A photo at the working grid, with what it is (the readers check it on opening)."""
    with open_scan(folder.fields[index], folder.calibration) as scan:
        rgb = scan.read_region(0, 0, scan.width, scan.height)
        info = scan.info()
    field = FieldInfo(
        format=info.format.split(":")[-1],
        pixel_size_um=info.pixel_size_um,
        width=scan.width,
        height=scan.height,
        taken=qc.exposure(rgb),
    )
    return rgb, field


def _field_cells(
    index: int,
    normalised: np.ndarray,
    segmenter: Segmenter,
    stains: stain.StainEstimate,
    params: SlideParams,
    timer: StageTimer,
) -> list[Cell]:
    """StarDist over a field in windows (cores of TILE_PX with margins inside the field)."""
    height, width = normalised.shape[:2]
    side, margin = tiles.TILE_PX, tiles.DEFAULT_MARGIN_PX
    kept: list[Cell] = []
    for top in range(0, height, side):
        for left in range(0, width, side):
            bottom, right = min(top + side, height), min(left + side, width)
            y0, x0 = max(top - margin, 0), max(left - margin, 0)
            y1, x1 = min(bottom + margin, height), min(right + margin, width)
            kept += cells_in_window(
                normalised[y0:y1, x0:x1],
                (top - y0, left - x0, bottom - y0, right - x0),
                segmenter,
                stains,
                params,
                timer,
                origin=(x0, y0),
                tile_id=index,
            )
    return kept


def _paste(thumbnail: np.ndarray, rgb: np.ndarray, origin: tuple[int, int], scale: float) -> None:
    """Put a field (working grid) on the sheet's thumbnail (``scale`` grid px per thumb px)."""
    x, y = round(origin[0] / scale), round(origin[1] / scale)
    w = max(1, min(round(rgb.shape[1] / scale), thumbnail.shape[1] - x))
    h = max(1, min(round(rgb.shape[0] / scale), thumbnail.shape[0] - y))
    small = Image.fromarray(rgb).resize((w, h), Image.Resampling.BOX) if scale > 1 else None
    thumbnail[y : y + h, x : x + w] = np.asarray(small) if small is not None else rgb[:h, :w]


def _paste_all(
    thumbnail: np.ndarray,
    folder: FieldFolder,
    fields: Sequence[FieldInfo],
    sheet: ContactSheet,
    scale: float,
    target: Sequence[float],
) -> None:
    """The sheet of a slide that stopped before its fields were judged."""
    for index, field in enumerate(fields):
        rgb, _ = read_field(folder, index)
        balanced = white_balanced(rgb, field.taken.glass, target)
        _paste(thumbnail, balanced, sheet.origins[index], scale)


def _frame_failed(
    thumbnail: np.ndarray,
    judged: Sequence[qc.TileQC],
    fields: Sequence[FieldInfo],
    sheet: ContactSheet,
    scale: float,
) -> None:
    image = Image.fromarray(thumbnail)
    draw = ImageDraw.Draw(image)
    for result, field, (x, y) in zip(judged, fields, sheet.origins, strict=True):
        if result.artefact:
            right, bottom = (x + field.width) / scale - 1, (y + field.height) / scale - 1
            draw.rectangle((x / scale, y / scale, right, bottom), outline=FAILED_FRAME_RGB, width=2)
    thumbnail[:] = np.asarray(image)


def _outline(
    thumbnail: np.ndarray, kept: Sequence[Cell], origins: np.ndarray, scale: float
) -> None:
    """The kept cells' outlines on the sheet's thumbnail."""
    image = Image.fromarray(thumbnail)
    draw = ImageDraw.Draw(image)
    for cell, origin in zip(kept, origins, strict=True):
        ring = [(float(x) / scale, float(y) / scale) for x, y in cell.polygon + origin]
        draw.polygon(ring, outline=OUTLINE_RGB, width=max(1, round(2 / scale)))
    thumbnail[:] = np.asarray(image)
