"""Deterministic, cell-like 224x224 patches for parity and quantisation gates.

Random noise is a poor probe of a ViT: fidelity must be judged on inputs that look like what
the encoder will see. Each patch is centred on a nucleated cell (purple, textured nucleus
in bluish cytoplasm) on a pale background with pink red-cell discs around it, lightly
blurred like a 40x scan. numpy only.
"""

from __future__ import annotations

import numpy as np

from export.encoder import IMAGE_SIZE, MEAN, STD

_BACKGROUND = np.array([236.0, 226.0, 232.0])
_RBC = np.array([222.0, 150.0, 160.0])
_CYTOPLASM = np.array([170.0, 160.0, 205.0])
_NUCLEUS = np.array([95.0, 55.0, 135.0])


def render_cells(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """``count`` cell patches as uint8 (count, size, size, 3), the same for the same seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([_render_one(rng, yy, xx, size) for _ in range(count)])


def normalise(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW with DinoBloom's mean / std (the encoder's ``pixels``)."""
    x = images_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def cell_pixels(count: int, seed: int = 0) -> np.ndarray:
    """Normalised cell-like encoder inputs, float32 (count, 3, 224, 224)."""
    return normalise(render_cells(count, seed))


def _render_one(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    image = np.broadcast_to(_BACKGROUND * rng.uniform(0.97, 1.02), (size, size, 3)).copy()
    image += rng.normal(0.0, 3.0, (size, size, 3))
    for _ in range(int(rng.integers(3, 9))):  # red cells: discs with a pale centre
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(22, 32)
        r = np.hypot(yy - cy, xx - cx) / radius
        disc = np.clip((1.0 - r) * 6.0, 0.0, 1.0)
        pallor = 0.45 * np.exp(-((r / 0.45) ** 2))
        colour = _RBC * rng.uniform(0.93, 1.05)
        image = _blend(image, colour, disc * (1.0 - pallor) * 0.85)
    # the nucleated cell in the centre, slightly off-centre like a real crop
    cy, cx = size / 2 + rng.normal(0, 6, 2)
    cell_radius = rng.uniform(45, 70)
    angle = rng.uniform(0, np.pi)
    cell = _ellipse(yy, xx, cy, cx, cell_radius, cell_radius * rng.uniform(0.8, 1.0), angle)
    image = _blend(image, _CYTOPLASM * rng.uniform(0.9, 1.08), cell * 0.9)
    offset = rng.uniform(0.0, 0.45) * cell_radius  # eccentric nucleus (plasma-cell like)
    ny, nx = cy + offset * np.sin(angle), cx + offset * np.cos(angle)
    nucleus_radius = cell_radius * rng.uniform(0.45, 0.7)
    nucleus = _ellipse(
        yy, xx, ny, nx, nucleus_radius, nucleus_radius * rng.uniform(0.75, 1.0), -angle
    )
    chromatin = _texture(rng, size)
    nucleus_colour = _NUCLEUS[None, None, :] * (0.75 + 0.5 * chromatin[..., None])
    image = image * (1.0 - nucleus[..., None]) + nucleus_colour * nucleus[..., None]
    return np.clip(_blur(image), 0, 255).astype(np.uint8)


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float
) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    return np.clip((1.0 - np.hypot(u, v)) * 8.0, 0.0, 1.0)


def _blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return image * (1.0 - alpha[..., None]) + colour * alpha[..., None]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clumped chromatin: coarse noise upsampled to the patch, in [0, 1]."""
    coarse = rng.uniform(0.0, 1.0, (size // 8 + 1, size // 8 + 1))
    fine = np.kron(coarse, np.ones((8, 8)))[:size, :size]
    fine = _blur(fine[..., None])[..., 0]
    return (fine - fine.min()) / max(float(np.ptp(fine)), 1e-6)


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable 5-tap binomial blur (about the optical blur of a 40x scan)."""
    kernel = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    out = image
    for axis in (0, 1):
        padded = np.pad(out, [(2, 2) if a == axis else (0, 0) for a in range(out.ndim)], "edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(kernel))
    return out
