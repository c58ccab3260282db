"""Macenko stain estimation and normalisation for Romanowsky (Giemsa) stains, in numpy.

Two stains, as METHOD.md A: *basophilic* (azure B / methylene blue: nuclei,
basophilic cytoplasm) and *eosinophilic* (eosin Y: red cells, granules). Both
are unit optical-density (OD) vectors over (R, G, B), rows of a 2x3 matrix.

Why our own ~100 lines and not torchstain or tiatoolbox: torchstain's numpy
Macenko re-estimates the stain matrix on every ``normalize`` call and keeps the
estimation steps in name-mangled private methods, so "estimate once per slide
from sampled tiles, then apply per tile" is not possible through its API; it
also hard-codes an H&E reference and works in float64. tiatoolbox is several
hundred MB of dependencies for the same 2x3 matrix. The algorithm (Macenko et
al., ISBI 2009) is short: OD of the stained pixels, the plane of the two main
eigenvectors, the robust extreme angles (1st / 99th percentile) in that plane
as the stain vectors, concentrations by least squares, the 99th percentile of
each concentration as its maximum.

OD here is base 10 relative to the slide's own glass colour (``background``),
so that a pale-grey or tinted background is not read as stain.

Which pixels are stained: total OD (summed over R, G, B) of at least
``STAINED_OD``, not "every channel above a floor" as in the original paper. A
Giemsa nucleus is purple: it transmits red and blue and absorbs green, so on
real photos (the BCCD fields) the per-channel rule dropped nearly every
nucleus and Macenko found no basophilic direction; on the synthetic smears,
whose basophilic dye absorbs all three channels, both rules give the same
stain vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.bundle_format import StainReference

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
OD_MIN = 0.065  # the per-channel floor of the paper's rule; the total below is 3 times it
STAINED_OD = 3 * OD_MIN  # pixels with less OD summed over R, G, B are glass
ANGLE_PERCENTILE = 1.0
PIXELS_PER_TILE = 20_000  # sampled from each tile given to estimate_stains
# A dye is coloured: a basophilic direction closer than this to neutral grey is what a
# hair, dust or uneven light absorbs, not a stain (synthetic smears: 15-25 degrees, the
# BCCD photos 38; the Chula photos, which hold no white cells but a hair: 5).
MIN_DYE_ANGLE_DEG = 10.0
MIN_STAINED_PIXELS = 500
TILE_PX = 800  # 200 um at 0.25 um/px: the unit of the intensity percentiles


class StainError(ValueError):
    """Stains cannot be estimated (e.g. a blank slide); ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class StainEstimate:
    """A slide's stains: rows basophilic, eosinophilic (unit OD), their 99th-percentile maxima."""

    stain_matrix: np.ndarray  # (2, 3) float32
    max_concentrations: np.ndarray  # (2,) float32
    background: np.ndarray  # (3,) float32 RGB of the glass


def reference_stains(reference: StainReference) -> StainEstimate:
    """The bundle's reference as a slide's stains are held: what normalised pixels
    show, and the glass camera fields are balanced to."""
    return StainEstimate(
        np.asarray(reference.stain_matrix, np.float32),
        np.asarray(reference.max_concentrations, np.float32),
        np.asarray(reference.background, np.float32),
    )


def luminance(rgb: Sequence[float] | np.ndarray) -> float:
    """Luminance (0-255) of one colour, e.g. a slide's glass."""
    return float(np.asarray(rgb, np.float32) @ LUMA)


def mean_intensity(rgb: np.ndarray) -> float:
    """Mean luminance (0-255) of an RGB image: the QC "intensity" of a tile."""
    return float(rgb.reshape(-1, 3).mean(axis=0) @ LUMA)


def optical_density(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """float32 (..., 3) OD relative to the glass; never negative."""
    if rgb.dtype != np.uint8:
        ratio = (rgb.astype(np.float32) + 1.0) / (background.astype(np.float32) + 1.0)
        return np.maximum(-np.log10(ratio), 0.0)
    # A uint8 channel has 256 levels: the same arithmetic on those, then one lookup per
    # pixel (the same values, bit for bit, at a quarter of the cost of a log per pixel).
    table = optical_density(np.arange(256, dtype=np.float32)[:, None], background).T
    out = np.empty(rgb.shape, np.float32)
    for channel in range(3):
        np.take(table[channel], rgb[..., channel], out=out[..., channel])
    return out


def _glass(pixels: np.ndarray) -> np.ndarray:
    """Glass colour: the median of the brightest 2 % of pixels (smears are mostly glass)."""
    lum = pixels.astype(np.float32) @ LUMA
    bright = pixels[lum >= np.percentile(lum, 98)]
    return np.clip(np.median(bright, axis=0), 120, 255).astype(np.float32)


def _sample(tiles: Iterable[np.ndarray], per_tile: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chunks = []
    for tile in tiles:
        pixels = tile.reshape(-1, 3)
        if pixels.shape[0] > per_tile:
            pixels = pixels[rng.choice(pixels.shape[0], per_tile, replace=False)]
        chunks.append(pixels.astype(np.float32))
    if not chunks:
        raise StainError("no tiles to estimate stains from")
    return np.concatenate(chunks)


def estimate_stains(
    tiles: Iterable[np.ndarray], per_tile: int = PIXELS_PER_TILE, seed: int = 0
) -> StainEstimate:
    """Macenko on pixels sampled from ``tiles`` (uint8 RGB arrays); raises StainError."""
    pixels = _sample(tiles, per_tile, seed)
    background = _glass(pixels)
    od = optical_density(pixels, background)
    stained = od[od.sum(axis=1) >= STAINED_OD]
    if stained.shape[0] < MIN_STAINED_PIXELS:
        raise StainError(f"only {stained.shape[0]} stained pixels: too few to estimate stains")
    _, vectors = np.linalg.eigh(np.cov(stained.T))
    plane = vectors[:, 1:3]  # the two largest eigenvalues
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    projected = stained @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Basophilic dyes absorb red strongly; eosin hardly does: the larger red OD is basophilic.
    baso, eos = (v1, v2) if v1[0] / v1.sum() > v2[0] / v2.sum() else (v2, v1)
    matrix = np.stack([baso, eos])
    matrix = np.abs(matrix) / np.linalg.norm(matrix, axis=1, keepdims=True)
    if _grey_angle(matrix[0]) < MIN_DYE_ANGLE_DEG:
        raise StainError(
            "no stained nuclei to estimate the stains from: what absorbs most on these "
            "images is grey (dust, a hair or uneven light), not a basophilic stain"
        )
    conc = stained @ np.linalg.pinv(matrix)
    maxima = np.percentile(conc, 99, axis=0).clip(1e-3)
    return StainEstimate(matrix.astype(np.float32), maxima.astype(np.float32), background)


def _grey_angle(vector: np.ndarray) -> float:
    """Degrees between an OD direction and neutral grey (equal absorption in R, G, B)."""
    cosine = float(vector @ np.full(3, 1 / np.sqrt(3))) / float(np.linalg.norm(vector))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def concentrations(rgb: np.ndarray, stains: StainEstimate) -> np.ndarray:
    """float32 (H, W, 2): basophilic and eosinophilic concentration per pixel."""
    od = optical_density(rgb, stains.background)
    return od @ np.linalg.pinv(stains.stain_matrix).astype(np.float32)


def basophilic(rgb: np.ndarray, stains: StainEstimate) -> np.ndarray:
    """float32 (H, W): the basophilic concentration (nuclei), >= 0; for nucleus and QC."""
    pinv = np.linalg.pinv(stains.stain_matrix).astype(np.float32)
    return np.maximum(optical_density(rgb, stains.background) @ pinv[:, 0], 0.0)


def basophilic_and_share(rgb: np.ndarray, stains: StainEstimate) -> tuple[np.ndarray, np.ndarray]:
    """float32 (H, W) twice, from one deconvolution: the basophilic concentration (as
    ``basophilic``) and its share of the pixel's staining, each stain's concentration
    taken relative to its maximum on the slide: 1 where only the basophilic stain is, 0
    where only eosin is (and on glass). The share tells a nucleus from a red cell whose
    colour partly deconvolves as basophilic (``appliance.pipeline.cells.nucleus_mask``)."""
    od = optical_density(rgb, stains.background)
    pinv = np.linalg.pinv(stains.stain_matrix).astype(np.float32)
    baso = np.maximum(od @ pinv[:, 0], 0.0)
    eos = np.maximum(od @ pinv[:, 1], 0.0)
    relative = baso / np.float32(stains.max_concentrations[0])
    total = relative + eos / np.float32(stains.max_concentrations[1])
    share = np.divide(relative, total, out=np.zeros_like(total), where=total > 0)
    return baso, share


def normalize(rgb: np.ndarray, stains: StainEstimate, reference: StainReference) -> np.ndarray:
    """uint8 RGB as if stained like the reference: same concentrations' shape, its colours."""
    target = reference_stains(reference)
    conc = np.maximum(concentrations(rgb, stains), 0.0)
    conc *= (target.max_concentrations / stains.max_concentrations).astype(np.float32)
    od = conc @ target.stain_matrix
    light = target.background * np.power(np.float32(10.0), -od, dtype=np.float32)
    return np.clip(light + 0.5, 0, 255).astype(np.uint8)


def _tiles_of(image: np.ndarray, side: int) -> Iterable[np.ndarray]:
    for y in range(0, max(image.shape[0] - side // 2, 1), side):
        for x in range(0, max(image.shape[1] - side // 2, 1), side):
            yield image[y : y + side, x : x + side]


def derive_reference(
    images: Iterable[np.ndarray], tile_px: int = TILE_PX, relative_to_glass: bool = False
) -> StainReference:
    """A bundle's ``stain_reference`` from reference images (uint8 RGB at 0.25 um/px).

    Stains: Macenko over all images' pixels. Intensity range: the 5th and 95th
    percentiles of the per-tile mean intensity (tiles of ``tile_px``; a smaller
    image counts as one tile), as QC compares each tile's mean against them.
    ``relative_to_glass`` (for a bundle whose QC says ``intensity_relative_to_glass``):
    each tile's mean scaled by the reference glass's luminance over its image's glass,
    as QC then scales a slide's tiles.
    """
    images = list(images)
    tiles = [tile for image in images for tile in _tiles_of(image, tile_px)]
    stains = estimate_stains(tiles)
    means = []
    for image in images:
        ratio = 1.0
        if relative_to_glass:
            ratio = luminance(stains.background) / luminance(_glass(image.reshape(-1, 3)))
        means += [mean_intensity(tile) * ratio for tile in _tiles_of(image, tile_px)]
    p5, p95 = np.percentile(means, [5, 95])
    # Rounded as bundle.json keeps them, so that a reference in use is the one written.
    matrix = stains.stain_matrix.round(6).tolist()
    return StainReference(
        stain_matrix=(tuple(matrix[0]), tuple(matrix[1])),
        max_concentrations=tuple(stains.max_concentrations.round(6).tolist()),
        intensity_p5=round(float(p5), 3),
        intensity_p95=round(float(p95), 3),
        background=tuple(stains.background.round(3).tolist()),
    )
