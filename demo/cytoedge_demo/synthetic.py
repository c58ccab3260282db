"""Synthetic Romanowsky-stained smears with hidden labels: the demo's and the tests' data.

Looks matched to real Giemsa blood-smear photos (BCCD): pale pinkish-grey glass,
red cells as pink discs with pale centres and darker rims, nucleated cells with
violet nuclei and light-blue/grey cytoplasm. Colour is made physically: each
object adds stain *concentrations* of two dyes (basophilic azure B / methylene
blue, eosinophilic eosin Y), turned into light by Beer-Lambert with the slide's
own (jittered) stain vectors, so Macenko estimation has a true answer
(``SlideTruth.stain_matrix``).

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
- ``render_cell_patches(n, seed)``: (n, 224, 224, 3) uint8 nucleus-centred cell
  images, as the pipeline feeds the encoder (calibration and benchmarks).
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
from scipy import ndimage

from runtime.labels import MYELOMA_MARKERS as MARKERS
from runtime.labels import PB_CLASSES

PIXEL_UM = 0.25

VARIANTS = ("good", "blurred", "faint", "dark", "blank")
LAYOUTS = ("monolayer", "smear")
CLONE_FRACTION = 0.7  # plasma cells carrying a positive slide's morphology change

_B = np.array([0.66, 0.70, 0.27])
_E = np.array([0.30, 0.78, 0.55])
# Rows: basophilic, eosinophilic; unit optical-density vectors over (R, G, B).
STAIN_MATRIX = np.stack([_B / np.linalg.norm(_B), _E / np.linalg.norm(_E)]).astype(np.float32)
BACKGROUND_RGB = (226.0, 223.0, 228.0)

_TILE = 256
_STRIP = 256
_NOISE_SIGMA = 1.5
_TEXTURE_SIDE = 192


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
    stain_jitter: float = 0.05  # per-slide variation of the stain vectors and strengths

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
@dataclass
class _Nucleated:
    id: int
    kind: str
    x: float
    y: float
    a: float  # cell semi-axes, px
    b: float
    angle: float
    h2: float  # outline harmonics (irregularity)
    h3: float
    phase2: float
    phase3: float
    nuc_r: float
    nuc_aspect: float
    nuc_dx: float
    nuc_dy: float
    lobes: int
    nuc_baso: float
    nuc_eos: float
    clump: float  # chromatin texture amplitude (0 fine/immature .. 0.6 coarse clumps)
    nucleolus: bool
    cyto_baso: float
    cyto_eos: float
    halo: float  # perinuclear pale zone strength
    granules: float
    texture: int
    affected: bool = False

    @property
    def reach(self) -> float:
        return max(self.a, self.b) * 1.15 + 3

    def truth(self) -> CellTruth:
        nucleus = math.pi * self.nuc_r**2 * self.nuc_aspect
        if self.lobes:
            nucleus = self.lobes * math.pi * (self.nuc_r * 0.55) ** 2
        return CellTruth(
            self.id,
            self.kind,
            self.x,
            self.y,
            math.pi * self.a * self.b,
            nucleus,
            self.affected,
        )


def _um(value: float) -> float:
    return value / PIXEL_UM


def _nucleated(
    rng: np.random.Generator, kind: str, cid: int, x: float, y: float, labels: dict[str, bool]
) -> _Nucleated:
    """Parameters of one nucleated cell; plasma cells shift with the slide's labels."""
    n = rng.normal
    cell_r, nuc_r, off, clump, cyto_baso, nucleolus, lobes = 0.0, 0.0, 0.0, 0.3, 0.2, False, 0
    nuc_baso, nuc_eos, cyto_eos, halo, granules = 0.68, 0.16, 0.03, 0.0, 0.0
    if kind == "plasma":
        cell_r, nuc_r, off = n(6.6, 0.6), n(3.8, 0.3), rng.uniform(0.45, 0.85)
        clump, cyto_baso, halo = n(0.42, 0.06), n(0.26, 0.04), rng.uniform(0.4, 0.7)
    elif kind == "lymphocyte":
        cell_r, nuc_r, off = n(4.3, 0.35), n(3.4, 0.25), rng.uniform(0.0, 0.3)
        clump, cyto_baso, nuc_baso = n(0.32, 0.05), n(0.16, 0.03), 0.8
    elif kind == "neutrophil":
        cell_r, nuc_r, lobes = n(6.0, 0.45), n(3.2, 0.25), int(rng.integers(2, 5))
        clump, cyto_baso, cyto_eos, granules = 0.15, 0.05, 0.1, 0.35
    elif kind == "blast":
        cell_r, nuc_r, off = n(7.2, 0.7), n(5.6, 0.5), rng.uniform(0.0, 0.35)
        clump, cyto_baso, nucleolus, nuc_baso = n(0.1, 0.03), n(0.3, 0.04), True, 0.55
    else:
        raise ValueError(kind)
    affected = kind == "plasma" and any(labels.values()) and rng.random() < CLONE_FRACTION
    if affected:
        if labels["del(17p)"]:
            nuc_r, clump, nucleolus = nuc_r * 1.22, clump * 0.4, True
        # Each marker moves its own feature (nucleus, cytoplasm blue, cell shape and
        # Golgi zone, cytoplasm red), so that co-occurring markers do not mimic each other.
        if labels["t(4;14)"]:
            cyto_baso, cell_r = cyto_baso * 2.2, cell_r * 1.06
        if labels["t(11;14)"]:
            cell_r, nuc_r, off, clump = cell_r * 0.78, nuc_r * 0.88, off * 0.3, clump * 1.6
            halo *= 0.2
        if labels["gain(1q)"]:
            cyto_eos += 0.3
    cell_r = max(cell_r, 3.0)
    nuc_r = float(np.clip(nuc_r, 1.5, cell_r * 0.92))
    aspect = rng.uniform(0.8, 0.97)
    a, b = _um(cell_r), _um(cell_r) * aspect
    room = max(0.0, b - _um(nuc_r) - 3)  # keep the nucleus inside the cell
    direction = rng.uniform(0, 2 * math.pi)
    return _Nucleated(
        id=cid,
        kind=kind,
        x=x,
        y=y,
        a=a,
        b=b,
        angle=rng.uniform(0, math.pi),
        h2=rng.uniform(0, 0.04),
        h3=rng.uniform(0, 0.03),
        phase2=rng.uniform(0, 2 * math.pi),
        phase3=rng.uniform(0, 2 * math.pi),
        nuc_r=_um(nuc_r),
        nuc_aspect=rng.uniform(0.85, 1.0),
        nuc_dx=math.cos(direction) * room * off,
        nuc_dy=math.sin(direction) * room * off,
        lobes=lobes,
        nuc_baso=nuc_baso * rng.uniform(0.9, 1.1),
        nuc_eos=nuc_eos,
        clump=max(clump, 0.02),
        nucleolus=nucleolus,
        cyto_baso=max(cyto_baso, 0.03),
        cyto_eos=cyto_eos,
        halo=halo,
        granules=granules,
        texture=int(rng.integers(0, 1 << 30)),
        affected=affected,
    )


@dataclass
class _Population:
    nucleated: list[_Nucleated]
    nuc_y: np.ndarray  # sorted y of nucleated (for strip lookup)
    rbc_x: np.ndarray
    rbc_y: np.ndarray  # sorted
    rbc_sprite: np.ndarray
    rbc_conc: np.ndarray
    sprites: list[np.ndarray]  # (s, s, 2) concentrations: basophilic, eosinophilic


def _rbc_sprites(rng: np.random.Generator, count: int = 24) -> list[np.ndarray]:
    """Red cells: biconcave discs (pale centre, darker rim), slightly elliptic."""
    sprites = []
    for _ in range(count):
        r = _um(rng.normal(3.75, 0.3))
        aspect = rng.uniform(0.88, 1.0)
        angle = rng.uniform(0, math.pi)
        half = math.ceil(r + 3)
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        rho = np.sqrt((u / r) ** 2 + (v / (r * aspect)) ** 2)
        t = np.clip((rho - 0.1) / 0.6, 0, 1)
        profile = 0.3 + 0.7 * t * t * (3 - 2 * t) + 0.18 * np.exp(-(((rho - 0.86) / 0.1) ** 2))
        edge = np.clip((1 - rho) * r / 1.2 + 0.5, 0, 1)
        conc = profile * edge
        sprites.append(np.stack([conc * 0.035, conc * 0.19], axis=-1).astype(np.float32))
    return sprites


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


def _population(spec: SmearSpec, labels: dict[str, bool], kinds: dict[str, float]) -> _Population:
    rng = np.random.default_rng([spec.seed, 1])
    sprites = _rbc_sprites(rng)
    lo, hi = _zones(spec)
    nucleated: list[_Nucleated] = []
    blank = spec.variant == "blank"
    if not blank and spec.nucleated_per_mm2 > 0:
        spacing = _um(1000.0 / math.sqrt(spec.nucleated_per_mm2))
        names, probs = list(kinds), np.array(list(kinds.values()))
        probs = probs / probs.sum()
        for gy in np.arange(spacing / 2, spec.height, spacing):
            for gx in np.arange(spacing / 2, hi, spacing):
                x = gx + rng.uniform(-0.25, 0.25) * spacing
                y = gy + rng.uniform(-0.25, 0.25) * spacing
                kind = names[int(rng.choice(len(names), p=probs))]
                nucleated.append(_nucleated(rng, kind, len(nucleated) + 1, x, y, labels))
    nucleated.sort(key=lambda c: c.y)
    rbc_area = math.pi * _um(3.75) ** 2
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
    return _Population(
        nucleated=nucleated,
        nuc_y=np.array([c.y for c in nucleated]),
        rbc_x=rbc_x[order],
        rbc_y=rbc_y[order],
        rbc_sprite=rng.integers(0, len(sprites), rbc_x.size)[order],
        rbc_conc=rng.normal(1.0, 0.1, rbc_x.size)[order].astype(np.float32),
        sprites=sprites,
    )


def _clear_of_nucleated(
    x: np.ndarray, y: np.ndarray, cells: list[_Nucleated], thick_until: float
) -> np.ndarray:
    """Red cells in the monolayer do not lie on nucleated cells (they do in the thick body)."""
    cx = np.array([c.x for c in cells])
    cy = np.array([c.y for c in cells])
    cr = np.array([c.reach for c in cells]) + _um(3.0)
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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _texture(seed: int, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((_TEXTURE_SIDE, _TEXTURE_SIDE)), sigma)
    return (noise / (noise.std() + 1e-9)).astype(np.float32)


def _soft(rho: np.ndarray, radius_px: float) -> np.ndarray:
    """Anti-aliased inside-ness of rho < 1 over about one pixel."""
    return np.clip((1 - rho) * radius_px + 0.5, 0, 1)


def _draw_nucleated(
    cell: _Nucleated,
    conc: np.ndarray,
    cell_ids: np.ndarray | None,
    nuc_ids: np.ndarray | None,
    x0: int,
    y0: int,
) -> None:
    """Add one cell's stain concentrations (and ids) into the region whose origin is (x0, y0)."""
    h, w = conc.shape[:2]
    reach = cell.reach
    gx0, gx1 = max(int(cell.x - reach), x0), min(int(cell.x + reach) + 2, x0 + w)
    gy0, gy1 = max(int(cell.y - reach), y0), min(int(cell.y + reach) + 2, y0 + h)
    if gx0 >= gx1 or gy0 >= gy1:
        return
    yy, xx = np.mgrid[gy0:gy1, gx0:gx1].astype(np.float32)
    dx, dy = xx - cell.x, yy - cell.y
    cos, sin = math.cos(cell.angle), math.sin(cell.angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    theta = np.arctan2(v, u)
    wobble = (
        1 + cell.h2 * np.cos(2 * theta + cell.phase2) + cell.h3 * np.cos(3 * theta + cell.phase3)
    )
    rho_cell = np.sqrt((u / cell.a) ** 2 + (v / cell.b) ** 2) / wobble
    inside_cell = _soft(rho_cell, cell.a)
    nu, nv = u - cell.nuc_dx, v - cell.nuc_dy
    if cell.lobes:
        rho_nuc = np.full(u.shape, np.inf, np.float32)
        lobe_r = cell.nuc_r * 0.55
        for k in range(cell.lobes):
            phi = cell.phase2 + 2 * math.pi * k / cell.lobes
            lx, ly = math.cos(phi) * cell.nuc_r * 0.55, math.sin(phi) * cell.nuc_r * 0.55
            rho_nuc = np.minimum(rho_nuc, np.sqrt((nu - lx) ** 2 + (nv - ly) ** 2) / lobe_r)
        nuc_scale = lobe_r
    else:
        rho_nuc = np.sqrt((nu / cell.nuc_r) ** 2 + (nv / (cell.nuc_r * cell.nuc_aspect)) ** 2)
        nuc_scale = cell.nuc_r
    inside_nuc = _soft(rho_nuc, nuc_scale) * inside_cell
    rng_off = cell.texture % (_TEXTURE_SIDE - (gy1 - gy0) - 1 or 1)
    tex_y = slice(rng_off, rng_off + gy1 - gy0)
    off_x = (cell.texture >> 8) % (_TEXTURE_SIDE - (gx1 - gx0) - 1 or 1)
    tex_x = slice(off_x, off_x + gx1 - gx0)
    fine, coarse = _TEXTURES[0][tex_y, tex_x], _TEXTURES[1][tex_y, tex_x]
    chromatin = 1 + cell.clump * np.clip(coarse * 1.4, -1.2, 1.6) + 0.08 * fine
    if cell.nucleolus:
        rho_nl = np.sqrt((nu + nuc_scale * 0.25) ** 2 + (nv - nuc_scale * 0.2) ** 2) / (
            nuc_scale * 0.22
        )
        chromatin = chromatin * (1 - 0.5 * _soft(rho_nl, nuc_scale * 0.22))
    cytoplasm = inside_cell * (1 - inside_nuc)
    baso_cyto = cell.cyto_baso * (1 + 0.1 * fine)
    if cell.halo:
        # The pale Golgi zone sits beside the nucleus, towards the cell's centre.
        norm = math.hypot(cell.nuc_dx, cell.nuc_dy) or 1.0
        hx = cell.nuc_dx - cell.nuc_dx / norm * cell.nuc_r * 1.05
        hy = cell.nuc_dy - cell.nuc_dy / norm * cell.nuc_r * 1.05
        rho_h = np.sqrt((u - hx) ** 2 + (v - hy) ** 2) / (cell.nuc_r * 0.75)
        baso_cyto = baso_cyto * (1 - cell.halo * np.clip(1.2 - rho_h, 0, 1))
    eos_cyto = cell.cyto_eos * (1 + cell.granules * np.clip(fine * 1.5, -1, 2))
    target = conc[gy0 - y0 : gy1 - y0, gx0 - x0 : gx1 - x0]
    target[..., 0] += cytoplasm * baso_cyto + inside_nuc * cell.nuc_baso * chromatin
    target[..., 1] += cytoplasm * eos_cyto + inside_nuc * cell.nuc_eos * chromatin
    if cell_ids is not None and nuc_ids is not None:
        region = (slice(gy0 - y0, gy1 - y0), slice(gx0 - x0, gx1 - x0))
        cell_ids[region][inside_cell >= 0.5] = cell.id
        nuc_ids[region][inside_nuc >= 0.5] = cell.id


_TEXTURES = (_texture(11, 1.0), _texture(12, 2.2))


@dataclass(frozen=True)
class _Look:
    """How concentrations become light on this slide (per-slide stain and variant)."""

    stains: np.ndarray  # (2, 3) unit OD vectors
    strength: np.ndarray  # (2,) concentration multipliers
    background: np.ndarray  # (3,)
    blur_sigma: float


def _look(spec: SmearSpec) -> _Look:
    rng = np.random.default_rng([spec.seed, 3])
    jitter = spec.stain_jitter
    stains = STAIN_MATRIX + rng.normal(0, jitter, STAIN_MATRIX.shape).astype(np.float32)
    stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
    strength = rng.normal(1.0, jitter * 2, 2).clip(0.7, 1.3)
    strength *= {"faint": 0.3, "dark": 2.3}.get(spec.variant, 1.0)
    background = np.array(BACKGROUND_RGB) + rng.normal(0, 2, 3)
    blur = 4.0 if spec.variant == "blurred" else 0.4  # optics: slightly soft even when focused
    return _Look(stains.astype(np.float32), strength.astype(np.float32), background, blur)


def _render_region(
    pop: _Population, look: _Look, x0: int, y0: int, w: int, h: int, seed: int, masks: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """uint8 RGB (+ cell / nucleus ids) of slide pixels [y0, y0+h) x [x0, x0+w)."""
    margin = math.ceil(3 * look.blur_sigma) + 1
    rx0, ry0, rw, rh = x0 - margin, y0 - margin, w + 2 * margin, h + 2 * margin
    conc = np.zeros((rh, rw, 2), np.float32)
    cell_ids = np.zeros((rh, rw), np.uint32) if masks else None
    nuc_ids = np.zeros((rh, rw), np.uint32) if masks else None
    # Red cells first (nucleated cells lie on top where they meet in the thick body).
    half = max(s.shape[0] for s in pop.sprites) // 2 + 1
    lo, hi = np.searchsorted(pop.rbc_y, [ry0 - half, ry0 + rh + half])
    for i in range(lo, hi):
        sprite = pop.sprites[pop.rbc_sprite[i]]
        s = sprite.shape[0]
        sx, sy = round(pop.rbc_x[i]) - s // 2 - rx0, round(pop.rbc_y[i]) - s // 2 - ry0
        cx0, cy0, cx1, cy1 = max(sx, 0), max(sy, 0), min(sx + s, rw), min(sy + s, rh)
        if cx0 < cx1 and cy0 < cy1:
            conc[cy0:cy1, cx0:cx1] += (
                sprite[cy0 - sy : cy1 - sy, cx0 - sx : cx1 - sx] * pop.rbc_conc[i]
            )
    reach = max((c.reach for c in pop.nucleated), default=0) + 2
    lo, hi = np.searchsorted(pop.nuc_y, [ry0 - reach, ry0 + rh + reach])
    for cell in pop.nucleated[lo:hi]:
        _draw_nucleated(cell, conc, cell_ids, nuc_ids, rx0, ry0)
    od = (conc * look.strength) @ look.stains  # (rh, rw, 3)
    light = look.background.astype(np.float32) * np.exp(od * np.float32(-math.log(10)))
    light = ndimage.gaussian_filter(light, (look.blur_sigma, look.blur_sigma, 0))
    rng = np.random.default_rng([seed, 5, x0, y0])
    crop = (slice(margin, margin + h), slice(margin, margin + w))
    light = light[crop] + rng.standard_normal((h, w, 3), np.float32) * _NOISE_SIGMA
    image = np.clip(light + 0.5, 0, 255).astype(np.uint8)
    if masks:
        return image, cell_ids[crop], nuc_ids[crop]  # type: ignore[index]
    return image, None, None


def _kinds(spec: SmearSpec) -> dict[str, float]:
    rest = 1.0 - spec.plasma_fraction
    return {"plasma": spec.plasma_fraction, "lymphocyte": rest * 0.45, "neutrophil": rest * 0.55}


def _truth(spec: SmearSpec, labels: dict[str, bool], pop: _Population, look: _Look) -> SlideTruth:
    return SlideTruth(
        spec={k: v for k, v in asdict(spec).items() if k != "labels"},
        labels=labels,
        pixel_size_um=PIXEL_UM,
        stain_matrix=look.stains.tolist(),
        background_rgb=look.background.tolist(),
        cells=[c.truth() for c in pop.nucleated],
    )


def render_field(spec: SmearSpec) -> Field:
    """The whole smear in memory: use for fields up to a few thousand pixels a side."""
    labels = _labels_for(spec)
    pop = _population(spec, labels, _kinds(spec))
    look = _look(spec)
    image, cells, nuclei = _render_region(
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
_STRIP_JOB: tuple[_Population, _Look, SmearSpec, bool] | None = None  # set before a fork
PARALLEL_FROM_STRIPS = 32  # a slide of fewer strips is rendered in this process


def _render_strip(y0: int) -> _Strip:
    assert _STRIP_JOB is not None
    pop, look, spec, masks = _STRIP_JOB
    rows = min(_STRIP, spec.height - y0)
    return _render_region(pop, look, 0, y0, spec.width, rows, spec.seed, masks)


def _render_strips(
    pop: _Population, look: _Look, spec: SmearSpec, starts: range, masks: bool
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
# Single cells (peripheral-blood folders, encoder calibration)
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
_NO_LABELS = dict.fromkeys(MARKERS, False)


def _single_cell(rng: np.random.Generator, kind: str, side: int, seed: int) -> np.ndarray:
    """A ``side``x``side`` crop centred on one nucleated cell with red cells around it."""
    centre = side / 2
    cell = _nucleated(rng, kind, 1, centre, centre, _NO_LABELS)
    spec = SmearSpec(width=side, height=side, seed=seed)
    look = _look(spec)
    sprites = _rbc_sprites(rng, 6)
    n_rbc = int(rng.integers(2, 8))
    angle = rng.uniform(0, 2 * math.pi, n_rbc)
    dist = cell.reach + _um(3.75) + rng.uniform(0, side / 3, n_rbc)
    order = np.argsort(centre + np.sin(angle) * dist)
    pop = _Population(
        nucleated=[cell],
        nuc_y=np.array([cell.y]),
        rbc_x=(centre + np.cos(angle) * dist)[order],
        rbc_y=(centre + np.sin(angle) * dist)[order],
        rbc_sprite=rng.integers(0, len(sprites), n_rbc),
        rbc_conc=rng.normal(1.0, 0.1, n_rbc).astype(np.float32),
        sprites=sprites,
    )
    image, _, _ = _render_region(pop, look, 0, 0, side, side, seed, masks=False)
    return image


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
            crop = _single_cell(rng, kind, 144, seed * 100_003 + p * 1_009 + c)
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


def render_cell_patches(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """(n, size, size, 3) uint8 realistic nucleated-cell images, nucleus-centred.

    Made as the pipeline makes encoder inputs: a 128x128 crop at 0.25 um/px around
    the cell, resized bilinearly to ``size``. A mix of plasma cells, lymphocytes,
    neutrophils and blasts; for int8 calibration and encoder benchmarks.
    """
    rng = np.random.default_rng([seed, 13])
    kinds = ("plasma", "lymphocyte", "neutrophil", "blast")
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        crop = _single_cell(rng, kinds[i % len(kinds)], 128, seed * 7919 + i)
        out[i] = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))
    return out


def with_variant(spec: SmearSpec, variant: str) -> SmearSpec:
    """The same slide (seed, labels, size) with another QC variant."""
    return replace(spec, variant=variant)
