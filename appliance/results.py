"""Versioned result folders: never a half-written file, never a half-written version.

Layout (docs/DESIGN.md "Result folders")::

    <outbox>/<case_id>/v<N>/   result.json report.html report.pdf gallery.png
                               cells.geojson embeddings.npz
                               slides/<slide_id>/ cells.csv cells.geojson
                                                  heatmap.png thumbnail.png
    <outbox>/<case_id>/latest.json   {"version": N, "path": "v<N>"}

Every file is written to a temporary name and renamed; the version folder is
assembled under a temporary name and renamed into place whole, so a reader
(the window, the service) sees either no version N or a complete one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from appliance.report import render_report_html, write_report_pdf
from runtime.files import write_bytes_atomic, write_json_atomic, write_text_atomic

SCHEMA_VERSION = 1
GALLERY_CELLS = 20
VERSION_DIR = re.compile(r"^v(\d+)$")
log = logging.getLogger(__name__)


class ResultWriteError(RuntimeError):
    """A result folder that could not be written; nothing partial was left behind."""


@dataclass
class SlideOutputs:
    """What one slide contributes to a case's result folder."""

    slide_id: str
    thumbnail: np.ndarray  # (h, w, 3) uint8
    thumbnail_scale: float  # slide pixels (as in cell_xy) per thumbnail pixel
    cell_xy: np.ndarray  # (n, 2) float, slide pixel coordinates (x, y)
    attention: np.ndarray  # (n,) float, this slide's cells' attention in the case
    cells_csv: str  # the cell table as CSV text, attention column included
    geojson: dict[str, Any]  # FeatureCollection, attention in each feature's measurements


@dataclass
class CaseOutputs:
    """Everything written for one case version besides what the writer derives."""

    result: dict[str, Any]  # result.json content; version and outputs are filled in here
    slides: list[SlideOutputs]
    gallery_patches: list[np.ndarray] = field(default_factory=list)  # (s, s, 3) uint8
    gallery_captions: list[str] = field(default_factory=list)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # saved to embeddings.npz


@dataclass(frozen=True)
class ResultFolder:
    case_dir: Path
    version: int
    path: Path


def safe_name(text: str) -> str:
    """A folder name made from a case or slide id: no separators, no dot files."""
    cleaned = re.sub(r"[^\w.+-]", "_", text, flags=re.UNICODE).strip("._")
    return cleaned[:120] or "unnamed"


# --- pictures and arrays, written atomically ------------------------------------


def write_png_atomic(target: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    write_bytes_atomic(target, buffer.getvalue())


def write_npz_atomic(target: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(target, buffer.getvalue())


# --- versions ----------------------------------------------------------------


def existing_versions(case_dir: Path) -> list[int]:
    if not case_dir.is_dir():
        return []
    versions = []
    for child in case_dir.iterdir():
        match = VERSION_DIR.match(child.name)
        if match and child.is_dir():
            versions.append(int(match.group(1)))
    return sorted(versions)


def latest_version(outbox: Path, case_id: str) -> ResultFolder | None:
    """The version latest.json points at, or None when the case has no result yet."""
    case_dir = outbox / safe_name(case_id)
    try:
        pointer = json.loads((case_dir / "latest.json").read_text(encoding="utf-8"))
        version = int(pointer["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = case_dir / f"v{version}"
    return ResultFolder(case_dir, version, path) if path.is_dir() else None


def write_case_result(
    outbox: Path,
    case_id: str,
    outputs: CaseOutputs,
    *,
    write_pdf: bool = True,
    _after_file: Callable[[str], None] | None = None,
) -> ResultFolder:
    """Write version N+1 of a case's result and point latest.json at it.

    ``_after_file`` is called with each file name once written (tests use it to
    fail midway and check that nothing partial is left).
    """
    case_dir = outbox / safe_name(case_id)
    case_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=case_dir))
    try:
        version = (existing_versions(case_dir) or [0])[-1] + 1
        _write_version_files(staging, version, outputs, write_pdf, _after_file)
        final = _rename_into_place(staging, case_dir, version, outputs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    version = int(final.name[1:])
    write_json_atomic(case_dir / "latest.json", {"version": version, "path": final.name})
    log.info("result written", extra={"case": case_id, "version": version, "path": str(final)})
    return ResultFolder(case_dir, version, final)


def _rename_into_place(staging: Path, case_dir: Path, version: int, outputs: CaseOutputs) -> Path:
    # Two writers racing for the same N: the loser takes the next free number.
    for _ in range(100):
        final = case_dir / f"v{version}"
        try:
            os.rename(staging, final)  # fails when final exists and is not empty
            return final
        except OSError:
            if not final.exists():
                raise
            version = existing_versions(case_dir)[-1] + 1
            outputs.result["version"] = version
            write_json_atomic(staging / "result.json", outputs.result)
    raise ResultWriteError(f"could not find a free version number in {case_dir}")


def _write_version_files(
    folder: Path,
    version: int,
    outputs: CaseOutputs,
    write_pdf: bool,
    after_file: Callable[[str], None] | None,
) -> None:
    def done(name: str) -> None:
        if after_file is not None:
            after_file(name)

    result = outputs.result
    result["schema_version"] = SCHEMA_VERSION
    result["version"] = version
    files: dict[str, str] = {}

    for slide in outputs.slides:
        rel = Path("slides") / safe_name(slide.slide_id)
        write_text_atomic(folder / rel / "cells.csv", slide.cells_csv)
        write_json_atomic(folder / rel / "cells.geojson", slide.geojson)
        thumb = Image.fromarray(slide.thumbnail)
        write_png_atomic(folder / rel / "thumbnail.png", thumb)
        heat = render_heatmap(
            slide.thumbnail, slide.cell_xy / slide.thumbnail_scale, slide.attention
        )
        write_png_atomic(folder / rel / "heatmap.png", heat)
        files[f"slide:{slide.slide_id}:heatmap"] = str(rel / "heatmap.png")
        files[f"slide:{slide.slide_id}:cells_csv"] = str(rel / "cells.csv")
        files[f"slide:{slide.slide_id}:cells_geojson"] = str(rel / "cells.geojson")
        files[f"slide:{slide.slide_id}:thumbnail"] = str(rel / "thumbnail.png")
        done(str(rel))

    write_json_atomic(folder / "cells.geojson", merge_geojson([s.geojson for s in outputs.slides]))
    files["cells_geojson"] = "cells.geojson"
    done("cells.geojson")
    if outputs.embeddings:
        write_npz_atomic(folder / "embeddings.npz", outputs.embeddings)
        files["embeddings"] = "embeddings.npz"
        done("embeddings.npz")
    if outputs.gallery_patches:
        # One crop per top cell (rank order), for the window's enlarged view.
        for rank, patch in enumerate(outputs.gallery_patches, start=1):
            write_png_atomic(folder / "top_cells" / f"{rank:02d}.png", Image.fromarray(patch))
        gallery = render_gallery(outputs.gallery_patches, outputs.gallery_captions)
        write_png_atomic(folder / "gallery.png", gallery)
        files["gallery"] = "gallery.png"
        done("gallery.png")

    files["report_html"] = "report.html"
    pdf_made = False
    if write_pdf:
        files["report_pdf"] = "report.pdf"
    result["outputs"] = files
    html = render_report_html(result)
    if write_pdf:
        pdf_made = write_report_pdf(html, folder, folder / "report.pdf")
        if not pdf_made:
            del files["report_pdf"]
            html = render_report_html(result)
        done("report.pdf")
    write_text_atomic(folder / "report.html", html)
    done("report.html")
    write_json_atomic(folder / "result.json", result)
    done("result.json")


def merge_geojson(collections: Sequence[dict[str, Any]]) -> dict[str, Any]:
    features: list[Any] = []
    for collection in collections:
        features.extend(collection.get("features", []))
    return {"type": "FeatureCollection", "features": features}


# --- pictures ----------------------------------------------------------------


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
    font = _font(11)
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
    font = _font(11)
    for index, patch in enumerate(patches):
        row, col = divmod(index, columns)
        x, y = col * cell_px, row * (cell_px + caption_h)
        tile = Image.fromarray(np.asarray(patch, np.uint8)).resize((cell_px, cell_px))
        canvas.paste(tile, (x, y))
        text = captions[index] if index < len(captions) else ""
        for line_no, line in enumerate(text.split("\n")[:2]):
            draw.text((x + 3, y + cell_px + 2 + 13 * line_no), line, fill="black", font=font)
    return canvas


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()
