"""The pictures of a result folder: attention heatmaps over slide thumbnails, the gallery."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GALLERY_CELLS = 20


def attention_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 from blue (low) through white-ish to red (high)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    blue = np.array([40, 70, 220], np.float32)
    middle = np.array([240, 230, 120], np.float32)
    red = np.array([220, 30, 30], np.float32)
    low = blue + (middle - blue) * (v / 0.5)
    high = middle + (red - middle) * ((v - 0.5) / 0.5)
    return np.where(v < 0.5, low, high).round().astype(np.uint8)


def render_heatmap(thumbnail: np.ndarray, xy: np.ndarray, attention: np.ndarray) -> Image.Image:
    """Attention over the slide thumbnail: a smoothed field, blue low to red high, with a key."""
    from scipy.ndimage import gaussian_filter

    base = np.asarray(thumbnail, dtype=np.float32)
    h, w = base.shape[:2]
    weight = np.zeros((h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    att = np.asarray(attention, dtype=np.float32)
    if att.size:
        cols = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
        rows = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
        scaled = att / att.max() if att.max() > 0 else att
        np.add.at(weight, (rows, cols), scaled)
        np.add.at(count, (rows, cols), 1.0)
    sigma = max(2.0, min(h, w) / 60.0)
    weight = gaussian_filter(weight, sigma)
    count = gaussian_filter(count, sigma)
    covered = count > count.max() * 0.05 if count.max() > 0 else np.zeros_like(count, bool)
    mean_att = np.where(covered, weight / np.maximum(count, 1e-12), 0.0)
    colours = attention_colours(mean_att).astype(np.float32)
    alpha = np.where(covered, 0.55, 0.0)[..., None]
    blended = (base * (1 - alpha) + colours * alpha).round().astype(np.uint8)
    return _with_colour_key(Image.fromarray(blended))


def _with_colour_key(image: Image.Image) -> Image.Image:
    key_h = 28
    canvas = Image.new("RGB", (max(image.width, 220), image.height + key_h), "white")
    canvas.paste(image, (0, 0))
    bar = attention_colours(np.linspace(0, 1, 160))[None, :, :].repeat(10, axis=0)
    canvas.paste(Image.fromarray(bar), (40, image.height + 9))
    draw = ImageDraw.Draw(canvas)
    font = label_font(11)
    draw.text((4, image.height + 8), "low", fill="black", font=font)
    draw.text((204, image.height + 8), "high", fill="black", font=font)
    return canvas


def render_gallery(
    patches: Sequence[np.ndarray], captions: Sequence[str], columns: int = 5, cell_px: int = 128
) -> Image.Image:
    """The highest-attention cells in a grid, each with its caption underneath."""
    patches = list(patches)[:GALLERY_CELLS]
    rows = max(1, -(-len(patches) // columns))
    caption_h = 30
    canvas = Image.new("RGB", (columns * cell_px, rows * (cell_px + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    font = label_font(11)
    for index, patch in enumerate(patches):
        row, col = divmod(index, columns)
        x, y = col * cell_px, row * (cell_px + caption_h)
        tile = Image.fromarray(np.asarray(patch, np.uint8)).resize((cell_px, cell_px))
        canvas.paste(tile, (x, y))
        text = captions[index] if index < len(captions) else ""
        for line_no, line in enumerate(text.split("\n")[:2]):
            draw.text((x + 3, y + cell_px + 2 + 13 * line_no), line, fill="black", font=font)
    return canvas


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()
