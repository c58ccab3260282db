"""Synthetic Romanowsky-stained smears with hidden labels: the demo's and the tests' data.

Looks matched to real Giemsa blood-smear photos (BCCD): pale pinkish-grey glass,
red cells as pink discs with pale centres and darker rims, nucleated cells with
violet nuclei and light-blue/grey cytoplasm. The cells, red cells and stain are
drawn by ``export.probe_cells``, whose single cells are also the export gates'
probes: colour is made physically (stain concentrations through Beer-Lambert with
the slide's own jittered stain vectors), so Macenko estimation has a true answer
(``SlideTruth.stain_matrix``). This module lays the cells out into smears (density,
thick body and bare edge, QC variants), changes the clone's plasma cells by the
slide's labels, and writes the files.

Hidden per-slide labels for the 4 markers shift the morphology of a fraction
(``CLONE_FRACTION``) of the plasma cells. METHOD.md has no per-marker table,
so these directions are chosen, documented and deliberately learnable. Each
marker moves a feature of its own, so that markers present together do not
mimic each other (an earlier table had t(11;14) and gain(1q) both shrink the
cell, and the demo head confused them):

=========  ==============================================================
del(17p)   larger nuclei (x1.22 radius), immature fine chromatin (clumping
           x0.4), visible nucleolus
t(4;14)    deeply basophilic cytoplasm (x2.2 azure), slightly larger cell
t(11;14)   lymphoplasmacytoid: small cells (x0.78), nucleus central (x0.3
           offset), coarse chromatin (clumping x1.6), faint perinuclear
           Golgi zone (x0.2)
gain(1q)   flame-cell cytoplasm: strongly eosinophilic, red-purple (+0.3
           eosin concentration)
=========  ==============================================================

The changes are sized to be seen by the demo's random-weight encoder, whose
features follow colour and size far more than shape: an earlier gain(1q) of
higher N:C plus a faint eosin tint (+0.1), or two nuclei instead of one,
barely moved its embeddings, and the demo head could not find it at slide level.

Everything is deterministic by seed and rendered in horizontal strips, so an
8192x8192 slide is never held as a float array. Nothing here needs torch.

Entry points
- ``write_smear(path, spec) -> SlideTruth``: pyramidal tiled TIFF (zlib, levels
  /4, resolution tags in cm, which OpenSlide reads as mpp) + ``<stem>.truth.json``
  + optionally ``<stem>.masks.tif`` (page 0 cell ids, page 1 nucleus ids, uint32).
- ``render_field(spec) -> Field``: the same in memory (image + instance masks), for
  segmentation training and held-out scoring.
- ``write_cell_folders(root, ...)``: peripheral-blood patient folders of 144x144
  single-cell crops with ``.ready``; hidden class labels in ``root/labels.json``.
- ``segmentation_tiles(n, size, seed)``: fields with their nucleated-cell masks, what
  the demo's StarDist trains on and the segmentation benchmark scores.
"""

from __future__ import annotations

import collections
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from export.probe_cells import (
    FOCUSED_BLUR_PX,
    PIXEL_UM,
    STAIN_JITTER,
    CellShape,
    Look,
    Nucleated,
    Population,
    draw_shape,
    place_cell,
    rbc_sprites,
    render_region,
    single_cell,
    stain_look,
    um,
)
from runtime.labels import MYELOMA_MARKERS as MARKERS
from runtime.labels import PB_CLASSES

VARIANTS = ("good", "blurred", "faint", "dark", "blank")
LAYOUTS = ("monolayer", "smear")
CLONE_FRACTION = 0.7  # plasma cells carrying a positive slide's morphology change

_TILE = 256
_STRIP = 256
PB_CROP_PX = 144  # a blood patient's single-cell crops, as a cell-image analyser exports them


@dataclass(frozen=True)
class SmearSpec:
    """What to generate. Sizes in pixels at 0.25 um/px."""

    width: int = 2048
    height: int = 2048
    seed: int = 0
    labels: dict[str, bool] | None = None  # None: drawn from the seed (each marker p=0.5)
    nucleated_per_mm2: float = 480.0
    plasma_fraction: float = 0.45
    rbc_coverage: float = 0.32  # fraction of the glass covered by red cells (monolayer)
    variant: str = "good"  # one of VARIANTS
    layout: str = "monolayer"  # "smear": thick body at the left 12 %, bare edge at the right 12 %
    stain_jitter: float = STAIN_JITTER  # per-slide variation of the stain vectors and strengths

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}")
        if self.width < 16 or self.height < 16:
            raise ValueError("a smear is at least 16x16 px")
        if self.labels is not None and set(self.labels) != set(MARKERS):
            raise ValueError(f"labels must give exactly {MARKERS}")


@dataclass
class CellTruth:
    """One nucleated cell as generated (pixel units at 0.25 um/px, slide coordinates)."""

    id: int
    kind: str  # plasma | lymphocyte | neutrophil | blast
    x: float
    y: float
    cell_area_px: float
    nucleus_area_px: float
    affected: bool  # carries the slide's marker morphology


@dataclass
class SlideTruth:
    spec: dict[str, Any]
    labels: dict[str, bool]
    pixel_size_um: float
    stain_matrix: list[list[float]]
    background_rgb: list[float]
    cells: list[CellTruth] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Field:
    """An in-memory synthetic field: image and instance masks (0 = background)."""

    image: np.ndarray  # uint8 (H, W, 3)
    cells: np.ndarray  # uint32 (H, W): nucleated-cell ids
    nuclei: np.ndarray  # uint32 (H, W): the same ids, nucleus pixels only
    truth: SlideTruth


# --------------------------------------------------------------------------------------------
# Cell populations
# --------------------------------------------------------------------------------------------
def _cell_truth(cell: Nucleated) -> CellTruth:
    nucleus = math.pi * cell.nuc_r**2 * cell.nuc_aspect
    if cell.lobes:
        nucleus = cell.lobes * math.pi * (cell.nuc_r * 0.55) ** 2
    return CellTruth(
        cell.id,
        cell.kind,
        cell.x,
        cell.y,
        math.pi * cell.a * cell.b,
        nucleus,
        cell.affected,
    )


def _nucleated(
    rng: np.random.Generator, kind: str, cid: int, x: float, y: float, labels: dict[str, bool]
) -> Nucleated:
    """One nucleated cell of the smear; a clone's plasma cells shift with the slide's labels."""
    shape = draw_shape(rng, kind)
    affected = kind == "plasma" and any(labels.values()) and rng.random() < CLONE_FRACTION
    if affected:
        shape = clone_morphology(shape, labels)
    return place_cell(rng, shape, cid, x, y, affected)


def clone_morphology(shape: CellShape, labels: dict[str, bool]) -> CellShape:
    """The module docstring's table. Each marker moves its own feature (nucleus, cytoplasm
    blue, cell shape and Golgi zone, cytoplasm red), so that co-occurring markers do not
    mimic each other."""
    s = shape
    if labels["del(17p)"]:
        s = replace(s, nuc_r=s.nuc_r * 1.22, clump=s.clump * 0.4, nucleolus=True)
    if labels["t(4;14)"]:
        s = replace(s, cyto_baso=s.cyto_baso * 2.2, cell_r=s.cell_r * 1.06)
    if labels["t(11;14)"]:
        s = replace(
            s,
            cell_r=s.cell_r * 0.78,
            nuc_r=s.nuc_r * 0.88,
            off=s.off * 0.3,
            clump=s.clump * 1.6,
            halo=s.halo * 0.2,
        )
    if labels["gain(1q)"]:
        s = replace(s, cyto_eos=s.cyto_eos + 0.3)
    return s


def _labels_for(spec: SmearSpec) -> dict[str, bool]:
    if spec.labels is not None:
        return dict(spec.labels)
    rng = np.random.default_rng([spec.seed, 7])
    return {marker: bool(rng.random() < 0.5) for marker in MARKERS}


def _zones(spec: SmearSpec) -> tuple[float, float]:
    """x-range [lo, hi) of the monolayer; left of lo is the thick body, right of hi bare edge."""
    if spec.layout == "smear":
        return 0.12 * spec.width, 0.88 * spec.width
    return 0.0, float(spec.width)


def _population(spec: SmearSpec, labels: dict[str, bool], kinds: dict[str, float]) -> Population:
    rng = np.random.default_rng([spec.seed, 1])
    sprites = rbc_sprites(rng)
    lo, hi = _zones(spec)
    nucleated: list[Nucleated] = []
    blank = spec.variant == "blank"
    if not blank and spec.nucleated_per_mm2 > 0:
        spacing = um(1000.0 / math.sqrt(spec.nucleated_per_mm2))
        names, probs = list(kinds), np.array(list(kinds.values()))
        probs = probs / probs.sum()
        for gy in np.arange(spacing / 2, spec.height, spacing):
            for gx in np.arange(spacing / 2, hi, spacing):
                x = gx + rng.uniform(-0.25, 0.25) * spacing
                y = gy + rng.uniform(-0.25, 0.25) * spacing
                kind = names[int(rng.choice(len(names), p=probs))]
                nucleated.append(_nucleated(rng, kind, len(nucleated) + 1, x, y, labels))
    nucleated.sort(key=lambda c: c.y)
    rbc_area = math.pi * um(3.75) ** 2
    xs, ys = [], []
    if not blank:
        for x0, x1, coverage in ((0.0, lo, 1.6), (lo, hi, spec.rbc_coverage)):
            count = int(coverage * (x1 - x0) * spec.height / rbc_area)
            xs.append(rng.uniform(x0, x1, count))
            ys.append(rng.uniform(0, spec.height, count))
    rbc_x = np.concatenate(xs) if xs else np.zeros(0)
    rbc_y = np.concatenate(ys) if ys else np.zeros(0)
    if nucleated and rbc_x.size:
        keep = _clear_of_nucleated(rbc_x, rbc_y, nucleated, lo)
        rbc_x, rbc_y = rbc_x[keep], rbc_y[keep]
    order = np.argsort(rbc_y, kind="stable")
    return Population(
        nucleated=nucleated,
        nuc_y=np.array([c.y for c in nucleated]),
        rbc_x=rbc_x[order],
        rbc_y=rbc_y[order],
        rbc_sprite=rng.integers(0, len(sprites), rbc_x.size)[order],
        rbc_conc=rng.normal(1.0, 0.1, rbc_x.size)[order].astype(np.float32),
        sprites=sprites,
    )


def _clear_of_nucleated(
    x: np.ndarray, y: np.ndarray, cells: list[Nucleated], thick_until: float
) -> np.ndarray:
    """Red cells in the monolayer do not lie on nucleated cells (they do in the thick body)."""
    cx = np.array([c.x for c in cells])
    cy = np.array([c.y for c in cells])
    cr = np.array([c.reach for c in cells]) + um(3.0)
    bin_size = max(cr.max() * 2, 1.0)
    bins: dict[tuple[int, int], list[int]] = {}
    for i, (px, py) in enumerate(zip(cx // bin_size, cy // bin_size, strict=True)):
        bins.setdefault((int(px), int(py)), []).append(i)
    keep = np.ones(x.size, bool)
    bx, by = (x // bin_size).astype(np.int64), (y // bin_size).astype(np.int64)
    # Red cells sorted by bin, so that each nucleated bin looks at its 3 x 3
    # neighbourhood only (a real-size slide has ~10^5 bins and ~10^6 red cells).
    stride = int(max(by.max(initial=0), max(k[1] for k in bins))) + 3
    by_bin = np.argsort(bx * stride + by + 1, kind="stable")
    sorted_keys = (bx * stride + by + 1)[by_bin]
    monolayer = x >= thick_until
    for (kx, ky), members in bins.items():
        starts = [(kx + dx) * stride + ky + dy + 1 for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
        lo = np.searchsorted(sorted_keys, starts, side="left")
        hi = np.searchsorted(sorted_keys, starts, side="right")
        idx = np.concatenate([by_bin[a:b] for a, b in zip(lo, hi, strict=True)])
        idx = idx[monolayer[idx]]
        if idx.size == 0:
            continue
        m = np.array(members)
        d2 = (x[idx, None] - cx[None, m]) ** 2 + (y[idx, None] - cy[None, m]) ** 2
        keep[idx[(d2 < cr[None, m] ** 2).any(axis=1)]] = False
    return keep


def _look(spec: SmearSpec) -> Look:
    """The slide's look: its own jittered stain, made faint, dark or defocused by the variant."""
    strength_scale = {"faint": 0.3, "dark": 2.3}.get(spec.variant, 1.0)
    blur_sigma = 4.0 if spec.variant == "blurred" else FOCUSED_BLUR_PX
    return stain_look(spec.seed, spec.stain_jitter, strength_scale, blur_sigma)


def _kinds(spec: SmearSpec) -> dict[str, float]:
    rest = 1.0 - spec.plasma_fraction
    return {"plasma": spec.plasma_fraction, "lymphocyte": rest * 0.45, "neutrophil": rest * 0.55}


def _truth(spec: SmearSpec, labels: dict[str, bool], pop: Population, look: Look) -> SlideTruth:
    return SlideTruth(
        spec={k: v for k, v in asdict(spec).items() if k != "labels"},
        labels=labels,
        pixel_size_um=PIXEL_UM,
        stain_matrix=look.stains.tolist(),
        background_rgb=look.background.tolist(),
        cells=[_cell_truth(c) for c in pop.nucleated],
    )


def render_field(spec: SmearSpec) -> Field:
    """The whole smear in memory: use for fields up to a few thousand pixels a side."""
    labels = _labels_for(spec)
    pop = _population(spec, labels, _kinds(spec))
    look = _look(spec)
    image, cells, nuclei = render_region(
        pop, look, 0, 0, spec.width, spec.height, spec.seed, masks=True
    )
    assert cells is not None and nuclei is not None
    return Field(image, cells, nuclei, _truth(spec, labels, pop, look))


# --------------------------------------------------------------------------------------------
# Pyramidal TIFF
# --------------------------------------------------------------------------------------------
def truth_path(path: Path) -> Path:
    return path.with_name(path.stem + ".truth.json")


def masks_path(path: Path) -> Path:
    return path.with_name(path.stem + ".masks.tif")


def _tiles_of(strip: np.ndarray, width: int) -> Iterator[np.ndarray]:
    """Full-size tiles of a strip (padded with white at the right / bottom edges)."""
    rows = strip.shape[0]
    for tx in range(0, width, _TILE):
        tile = strip[:, tx : tx + _TILE]
        if tile.shape[0] != _TILE or tile.shape[1] != _TILE:
            padded = np.full((_TILE, _TILE, *strip.shape[2:]), 255 if strip.ndim == 3 else 0)
            padded = padded.astype(strip.dtype)
            padded[:rows, : tile.shape[1]] = tile
            tile = padded
        yield tile


def _write_page(
    tif: tifffile.TiffWriter,
    tiles: Iterator[np.ndarray],
    shape: tuple[int, ...],
    dtype: Any,
    um_per_px: float,
    reduced: bool,
) -> None:
    px_per_cm = 10_000.0 / um_per_px
    tif.write(
        tiles,
        shape=shape,
        dtype=dtype,
        tile=(_TILE, _TILE),
        compression="zlib",
        compressionargs={"level": 1},  # level 6 costs 3x the time for ~10 % smaller files
        photometric="rgb" if len(shape) == 3 else "minisblack",
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
        subfiletype=1 if reduced else 0,
        metadata=None,
    )


def _downsample4(image: np.ndarray) -> np.ndarray:
    """4x4 box average (Pillow's C reduce), dropping a partial last row / column of blocks."""
    h, w = image.shape[0] // 4 * 4, image.shape[1] // 4 * 4
    if h == 0 or w == 0:
        return np.ascontiguousarray(image[:1, :1])
    return np.asarray(Image.fromarray(np.ascontiguousarray(image[:h, :w])).reduce(4))


_Strip = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]
_STRIP_JOB: tuple[Population, Look, SmearSpec, bool] | None = None  # set before a fork
PARALLEL_FROM_STRIPS = 32  # a slide of fewer strips is rendered in this process


def _render_strip(y0: int) -> _Strip:
    assert _STRIP_JOB is not None
    pop, look, spec, masks = _STRIP_JOB
    rows = min(_STRIP, spec.height - y0)
    return render_region(pop, look, 0, y0, spec.width, rows, spec.seed, masks)


def _render_strips(
    pop: Population, look: Look, spec: SmearSpec, starts: range, masks: bool
) -> Iterator[_Strip]:
    """Level-0 strips in order. A large slide's strips are rendered by one forked
    process per CPU (each strip's noise is seeded by its position, so the pixels are
    the same either way); a few strips ahead at most are held in memory."""
    global _STRIP_JOB
    _STRIP_JOB = (pop, look, spec, masks)
    try:
        workers = min(os.cpu_count() or 1, 8)
        if len(starts) < PARALLEL_FROM_STRIPS or workers < 2 or os.name != "posix":
            yield from map(_render_strip, starts)
            return
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            ahead = collections.deque(
                pool.apply_async(_render_strip, (y0,)) for y0 in starts[: 2 * workers]
            )
            for y0 in starts[2 * workers :]:
                yield ahead.popleft().get()
                ahead.append(pool.apply_async(_render_strip, (y0,)))
            while ahead:
                yield ahead.popleft().get()
    finally:
        _STRIP_JOB = None


def write_smear(path: Path | str, spec: SmearSpec, masks: bool = False) -> SlideTruth:
    """Write a pyramidal tiled TIFF (levels /1, /4, /16, ... down to < 1024 px) + truth JSON.

    Memory: one 256-row strip of level 0 at a time; the reduced levels (1/16 of
    the area and less) are collected in a temporary memory-mapped file.
    """
    path = Path(path)
    labels = _labels_for(spec)
    pop = _population(spec, labels, _kinds(spec))
    look = _look(spec)
    width, height = spec.width, spec.height
    workdir = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=path.parent))
    try:
        level1 = np.lib.format.open_memmap(
            workdir / "level1.npy", mode="w+", dtype=np.uint8, shape=(height // 4, width // 4, 3)
        )
        cell_ids = nuc_ids = None
        if masks:
            cell_ids, nuc_ids = (
                np.lib.format.open_memmap(
                    workdir / f"{name}.npy", mode="w+", dtype=np.uint32, shape=(height, width)
                )
                for name in ("cells", "nuclei")
            )

        def level0_tiles() -> Iterator[np.ndarray]:
            starts = range(0, height, _STRIP)
            for y0, (strip, cells, nuclei) in zip(
                starts, _render_strips(pop, look, spec, starts, masks), strict=True
            ):
                rows = strip.shape[0]
                if cells is not None and nuclei is not None:
                    cell_ids[y0 : y0 + rows] = cells  # type: ignore[index]
                    nuc_ids[y0 : y0 + rows] = nuclei  # type: ignore[index]
                small = _downsample4(strip)
                level1[y0 // 4 : y0 // 4 + small.shape[0], : small.shape[1]] = small
                yield from _tiles_of(strip, width)

        with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
            _write_page(tif, level0_tiles(), (height, width, 3), np.uint8, PIXEL_UM, False)
            level, scale = level1, 4
            while level.shape[0] >= 1 and level.shape[1] >= 1:
                tiles = (
                    tile
                    for y0 in range(0, level.shape[0], _TILE)
                    for tile in _tiles_of(np.asarray(level[y0 : y0 + _TILE]), level.shape[1])
                )
                _write_page(tif, tiles, level.shape, np.uint8, PIXEL_UM * scale, True)
                if max(level.shape[:2]) < 1024:
                    break
                level, scale = _downsample4(np.asarray(level)), scale * 4
        if masks and cell_ids is not None and nuc_ids is not None:
            with tifffile.TiffWriter(masks_path(path)) as tif:
                for ids in (cell_ids, nuc_ids):
                    tiles = (
                        tile
                        for y0 in range(0, height, _TILE)
                        for tile in _tiles_of(np.asarray(ids[y0 : y0 + _TILE]), width)
                    )
                    _write_page(tif, tiles, (height, width), np.uint32, PIXEL_UM, False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    truth = _truth(spec, labels, pop, look)
    truth_path(path).write_text(json.dumps(truth.to_dict()), encoding="utf-8")
    return truth


def read_truth(path: Path | str) -> SlideTruth:
    """The truth written beside a smear by ``write_smear``."""
    data = json.loads(truth_path(Path(path)).read_text(encoding="utf-8"))
    data["cells"] = [CellTruth(**cell) for cell in data["cells"]]
    return SlideTruth(**data)


def read_masks(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(cell ids, nucleus ids) of a smear written with ``masks=True`` (whole arrays, uint32)."""
    source = masks_path(Path(path))
    return tifffile.imread(source, key=0), tifffile.imread(source, key=1)


# --------------------------------------------------------------------------------------------
# Single-cell folders (peripheral blood)
# --------------------------------------------------------------------------------------------
# Cell-type mixture per PB class: the learnable signal of the PB head.
_PB_MIXTURES: dict[str, dict[str, float]] = {
    "acute leukemia": {"blast": 0.6, "lymphocyte": 0.2, "neutrophil": 0.2},
    "lymphoma": {"lymphocyte": 0.7, "neutrophil": 0.25, "blast": 0.05},
    "MDS": {"neutrophil": 0.55, "blast": 0.15, "lymphocyte": 0.3},
    "MDS/MPN": {"neutrophil": 0.6, "blast": 0.1, "lymphocyte": 0.2, "plasma": 0.1},
    "MPN": {"neutrophil": 0.8, "lymphocyte": 0.15, "blast": 0.05},
    "plasma cell neoplasm": {"plasma": 0.5, "lymphocyte": 0.25, "neutrophil": 0.25},
    "reactive changes": {"lymphocyte": 0.5, "neutrophil": 0.4, "plasma": 0.1},
    "healthy": {"neutrophil": 0.6, "lymphocyte": 0.38, "plasma": 0.02},
}


def write_cell_folders(
    root: Path | str,
    n_patients: int,
    cells_per_patient: int = 100,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> dict[str, str]:
    """PB patient folders ``root/P0001/cell_0000.tif ...`` (144x144 RGB TIFF) + ``.ready``.

    Each patient's class is drawn from ``PB_CLASSES``, or is ``classes[i]`` for patient i
    when given (a balanced cohort). Returns {patient id: class}; the same mapping is
    written to ``root/labels.json`` (outside the patient folders, so the pipeline never
    sees it).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 9])
    labels: dict[str, str] = {}
    for p in range(n_patients):
        patient = f"P{p + 1:04d}"
        drawn = PB_CLASSES[int(rng.integers(0, len(PB_CLASSES)))]
        cls = drawn if classes is None else classes[p]
        mixture = _PB_MIXTURES[cls]
        names, probs = list(mixture), np.array(list(mixture.values()))
        folder = root / patient
        folder.mkdir(exist_ok=True)
        for c in range(cells_per_patient):
            kind = names[int(rng.choice(len(names), p=probs / probs.sum()))]
            crop = single_cell(rng, kind, PB_CROP_PX, seed * 100_003 + p * 1_009 + c)
            Image.fromarray(crop).save(folder / f"cell_{c:04d}.tif")
        (folder / ".ready").touch()
        labels[patient] = cls
    (root / "labels.json").write_text(json.dumps(labels, indent=1), encoding="utf-8")
    return labels


def segmentation_tiles(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(RGB uint8 fields, nucleated-cell instance masks): StarDist training and held-out tiles."""
    images, masks = [], []
    for index in range(n):
        spec = SmearSpec(
            width=size, height=size, seed=seed * 1000 + index, nucleated_per_mm2=1500.0
        )
        field_ = render_field(spec)
        images.append(field_.image)
        masks.append(field_.cells.astype(np.int32))
    return images, masks


def with_variant(spec: SmearSpec, variant: str) -> SmearSpec:
    """The same slide (seed, labels, size) with another QC variant."""
    return replace(spec, variant=variant)
