"""Cell-like probe images for the export gates, and the cell drawing of the demo's smears.

A network's numerics are judged on inputs that look like what it will see, not on noise:
one nucleated cell (plasma cell, lymphocyte, neutrophil or blast) with red cells around
it on pale glass, as a Romanowsky-stained smear shows it. Colour is made physically: each
object adds stain *concentrations* of two dyes (basophilic azure B / methylene blue,
eosinophilic eosin Y), turned into light by Beer-Lambert with the slide's own (jittered)
stain vectors, then blurred a little by the optics and given sensor noise.

The demo's synthetic smears (``cytoedge_demo.synthetic``) draw their cells with this
code, so the probes are the smears' cells and the drawing exists once. More than the
single cell lives here because a probe is rendered as a tiny slide: the region renderer
(``render_region``) and the slide's look (``stain_look``) are the smears' too. A cell's
parameters come from two calls on one random stream, ``draw_shape`` (the kind's sizes
and stains) and then ``place_cell`` (outline, nucleus position, texture), because on a
smear a clone's plasma cells change shape between the two draws (the demo's labels);
splitting there keeps the stream, and so every pixel, as it was.

numpy, scipy and Pillow only; deterministic by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

PIXEL_UM = 0.25
STAIN_JITTER = 0.05  # per-slide variation of the stain vectors and strengths
FOCUSED_BLUR_PX = 0.4  # optics: slightly soft even when focused
KINDS = ("plasma", "lymphocyte", "neutrophil", "blast")

_B = np.array([0.66, 0.70, 0.27])
_E = np.array([0.30, 0.78, 0.55])
# Rows: basophilic, eosinophilic; unit optical-density vectors over (R, G, B).
STAIN_MATRIX = np.stack([_B / np.linalg.norm(_B), _E / np.linalg.norm(_E)]).astype(np.float32)
BACKGROUND_RGB = (226.0, 223.0, 228.0)

_NOISE_SIGMA = 1.5
_TEXTURE_SIDE = 192


def um(value: float) -> float:
    """Micrometres as pixels at ``PIXEL_UM``."""
    return value / PIXEL_UM


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellShape:
    """What a cell's kind decides (radii in um), before the cell is placed and outlined."""

    kind: str
    cell_r: float
    nuc_r: float
    off: float  # nucleus offset, as a share of the room the cell leaves it
    clump: float  # chromatin texture amplitude (0 fine/immature .. 0.6 coarse clumps)
    cyto_baso: float
    nucleolus: bool
    lobes: int
    nuc_baso: float
    nuc_eos: float
    cyto_eos: float
    halo: float  # perinuclear pale zone strength
    granules: float


@dataclass
class Nucleated:
    """One nucleated cell as drawn (pixel units, slide coordinates)."""

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
    clump: float
    nucleolus: bool
    cyto_baso: float
    cyto_eos: float
    halo: float
    granules: float
    texture: int
    affected: bool = False

    @property
    def reach(self) -> float:
        return max(self.a, self.b) * 1.15 + 3


def draw_shape(rng: np.random.Generator, kind: str) -> CellShape:
    """The sizes and stains of a cell of ``kind`` (one of ``KINDS``)."""
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
    return CellShape(
        kind=kind,
        cell_r=cell_r,
        nuc_r=nuc_r,
        off=off,
        clump=clump,
        cyto_baso=cyto_baso,
        nucleolus=nucleolus,
        lobes=lobes,
        nuc_baso=nuc_baso,
        nuc_eos=nuc_eos,
        cyto_eos=cyto_eos,
        halo=halo,
        granules=granules,
    )


def place_cell(
    rng: np.random.Generator,
    shape: CellShape,
    cid: int,
    x: float,
    y: float,
    affected: bool = False,
) -> Nucleated:
    """The cell of ``shape`` centred at (x, y) px: its outline, nucleus position, texture."""
    cell_r = max(shape.cell_r, 3.0)
    nuc_r = float(np.clip(shape.nuc_r, 1.5, cell_r * 0.92))
    aspect = rng.uniform(0.8, 0.97)
    a, b = um(cell_r), um(cell_r) * aspect
    room = max(0.0, b - um(nuc_r) - 3)  # keep the nucleus inside the cell
    direction = rng.uniform(0, 2 * math.pi)
    # Keyword order is draw order: the random stream depends on it.
    return Nucleated(
        id=cid,
        kind=shape.kind,
        x=x,
        y=y,
        a=a,
        b=b,
        angle=rng.uniform(0, math.pi),
        h2=rng.uniform(0, 0.04),
        h3=rng.uniform(0, 0.03),
        phase2=rng.uniform(0, 2 * math.pi),
        phase3=rng.uniform(0, 2 * math.pi),
        nuc_r=um(nuc_r),
        nuc_aspect=rng.uniform(0.85, 1.0),
        nuc_dx=math.cos(direction) * room * shape.off,
        nuc_dy=math.sin(direction) * room * shape.off,
        lobes=shape.lobes,
        nuc_baso=shape.nuc_baso * rng.uniform(0.9, 1.1),
        nuc_eos=shape.nuc_eos,
        clump=max(shape.clump, 0.02),
        nucleolus=shape.nucleolus,
        cyto_baso=max(shape.cyto_baso, 0.03),
        cyto_eos=shape.cyto_eos,
        halo=shape.halo,
        granules=shape.granules,
        texture=int(rng.integers(0, 1 << 30)),
        affected=affected,
    )


def rbc_sprites(rng: np.random.Generator, count: int = 24) -> list[np.ndarray]:
    """Red cells: biconcave discs (pale centre, darker rim), slightly elliptic."""
    sprites = []
    for _ in range(count):
        r = um(rng.normal(3.75, 0.3))
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


@dataclass
class Population:
    """The objects of a slide (or of one probe crop) that ``render_region`` draws."""

    nucleated: list[Nucleated]
    nuc_y: np.ndarray  # sorted y of nucleated (for strip lookup)
    rbc_x: np.ndarray
    rbc_y: np.ndarray  # sorted
    rbc_sprite: np.ndarray
    rbc_conc: np.ndarray
    sprites: list[np.ndarray]  # (s, s, 2) concentrations: basophilic, eosinophilic


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _texture(seed: int, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((_TEXTURE_SIDE, _TEXTURE_SIDE)), sigma)
    return (noise / (noise.std() + 1e-9)).astype(np.float32)


_TEXTURES = (_texture(11, 1.0), _texture(12, 2.2))


def _soft(rho: np.ndarray, radius_px: float) -> np.ndarray:
    """Anti-aliased inside-ness of rho < 1 over about one pixel."""
    return np.clip((1 - rho) * radius_px + 0.5, 0, 1)


def _draw_nucleated(
    cell: Nucleated,
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


@dataclass(frozen=True)
class Look:
    """How concentrations become light on a slide (its stain, strength, glass and focus)."""

    stains: np.ndarray  # (2, 3) unit OD vectors
    strength: np.ndarray  # (2,) concentration multipliers
    background: np.ndarray  # (3,)
    blur_sigma: float


def stain_look(
    seed: int,
    jitter: float = STAIN_JITTER,
    strength_scale: float = 1.0,
    blur_sigma: float = FOCUSED_BLUR_PX,
) -> Look:
    """A slide's look: ``STAIN_MATRIX``, its strengths and the glass, jittered by ``seed``;
    ``strength_scale`` makes a faint or dark stain, ``blur_sigma`` a defocused scan."""
    rng = np.random.default_rng([seed, 3])
    stains = STAIN_MATRIX + rng.normal(0, jitter, STAIN_MATRIX.shape).astype(np.float32)
    stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
    strength = rng.normal(1.0, jitter * 2, 2).clip(0.7, 1.3)
    strength *= strength_scale
    background = np.array(BACKGROUND_RGB) + rng.normal(0, 2, 3)
    return Look(stains.astype(np.float32), strength.astype(np.float32), background, blur_sigma)


def render_region(
    pop: Population, look: Look, x0: int, y0: int, w: int, h: int, seed: int, masks: bool
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


# --------------------------------------------------------------------------------------------
# Single cells: the probes, and the demo's single-cell folders
# --------------------------------------------------------------------------------------------
def single_cell(
    rng: np.random.Generator,
    kind: str,
    side: int,
    seed: int,
    change: Callable[[CellShape], CellShape] | None = None,
) -> np.ndarray:
    """A ``side``x``side`` crop centred on one nucleated cell with red cells around it;
    ``change`` alters the drawn shape first (a marker's morphology, as on a smear)."""
    centre = side / 2
    shape = draw_shape(rng, kind)
    cell = place_cell(rng, change(shape) if change else shape, 1, centre, centre)
    look = stain_look(seed)
    sprites = rbc_sprites(rng, 6)
    n_rbc = int(rng.integers(2, 8))
    angle = rng.uniform(0, 2 * math.pi, n_rbc)
    dist = cell.reach + um(3.75) + rng.uniform(0, side / 3, n_rbc)
    order = np.argsort(centre + np.sin(angle) * dist)
    pop = Population(
        nucleated=[cell],
        nuc_y=np.array([cell.y]),
        rbc_x=(centre + np.cos(angle) * dist)[order],
        rbc_y=(centre + np.sin(angle) * dist)[order],
        rbc_sprite=rng.integers(0, len(sprites), n_rbc),
        rbc_conc=rng.normal(1.0, 0.1, n_rbc).astype(np.float32),
        sprites=sprites,
    )
    image, _, _ = render_region(pop, look, 0, 0, side, side, seed, masks=False)
    return image


def render_cell_patches(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """(n, size, size, 3) uint8 nucleus-centred cell images, the same per seed.

    Made as the pipeline makes encoder inputs: a 128x128 crop at 0.25 um/px around
    the cell, resized bilinearly to ``size``. The ``KINDS`` in turn; for the gates,
    int8 calibration and encoder benchmarks.
    """
    rng = np.random.default_rng([seed, 13])
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        crop = single_cell(rng, KINDS[i % len(KINDS)], 128, seed * 7919 + i)
        out[i] = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))
    return out
