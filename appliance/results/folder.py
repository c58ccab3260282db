"""Versioned result folders: never a half-written file, never a half-written version.

Layout (docs/DESIGN.md "Result folders")::

    <outbox>/<case>/v<N>/   result.json report.html report.pdf gallery.png
                            cells.geojson embeddings.npz patient_embedding.npy
                            top_cells/NN.png
                            cells/<class or unsure>/NN.png
                            slides/<slide>/ cells.csv cells.geojson
                                            heatmap.png thumbnail.png
    <outbox>/<case>/latest.json   {"version": N, "path": "v<N>"}

``<case>`` and ``<slide>`` are ``case_folders.unique_name`` of the ids: distinct ids
never share a folder.

Every file is written to a temporary name and renamed; the version folder is
assembled under a temporary name and renamed into place whole, so a reader
(the window, the service) sees either no version N or a complete one. Nothing
edits a version: a sign-off is version N+1, made from version N's files with
the review added (``write_reviewed_version``). Writers of one case take turns
(an flock on the case folder), so a re-score and a sign-off never claim one number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.results.case_folders import case_folder, unique_name
from appliance.results.pictures import render_gallery, render_heatmap
from appliance.results.report import render_report_html, write_report_pdf
from appliance.results.schema import (
    RESULT_FILE,
    CaseOutputs,
    CaseResult,
    ReviewRecord,
    SlideOutputs,
    read_result,
)
from runtime.files import group_readable, write_bytes_atomic, write_json_atomic, write_text_atomic

VERSION_DIR = re.compile(r"^v(\d+)$")
LATEST_FILE = "latest.json"
PATIENT_EMBEDDING_FILE = "patient_embedding.npy"
# Rewritten for a reviewed version; every other file is carried over from the one reviewed.
REPORT_FILES = frozenset({RESULT_FILE, "report.html", "report.pdf"})
log = logging.getLogger(__name__)


class ResultWriteError(RuntimeError):
    """A result folder that could not be written; nothing partial was left behind."""


@dataclass
class SlideContent:
    """What one slide contributes to a case's result folder besides its scan record."""

    slide_id: str
    thumbnail: np.ndarray  # (h, w, 3) uint8
    thumbnail_scale: float  # slide pixels (as in cell_xy) per thumbnail pixel
    cell_xy: np.ndarray  # (n, 2) float, slide pixel coordinates (x, y)
    attention: np.ndarray  # (n,) float, this slide's cells' attention in the case
    cells_csv: str  # the cell table as CSV text, attention column included
    geojson: dict[str, Any]  # FeatureCollection, attention in each feature's measurements


@dataclass
class CaseContent:
    """Everything written for one case version.

    ``result`` is complete but for what the writer decides: its ``version`` and its
    ``outputs`` (the files actually written) are set as the folder is written.
    """

    result: CaseResult
    slides: list[SlideContent]
    gallery_patches: list[np.ndarray] = field(default_factory=list)  # (s, s, 3) uint8
    gallery_captions: list[str] = field(default_factory=list)
    cell_gallery_patches: list[np.ndarray] = field(default_factory=list)  # result.cell_gallery
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # saved to embeddings.npz
    patient_embedding: np.ndarray | None = None  # saved to patient_embedding.npy


@dataclass(frozen=True)
class ResultFolder:
    case_dir: Path
    version: int
    path: Path


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
    return latest_in(case_folder(outbox, case_id))


def latest_in(case_dir: Path) -> ResultFolder | None:
    """The version the case folder's latest.json points at, or None."""
    try:
        pointer = json.loads((case_dir / LATEST_FILE).read_text(encoding="utf-8"))
        version = int(pointer["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = case_dir / f"v{version}"
    return ResultFolder(case_dir, version, path) if path.is_dir() else None


def find_version(target: str, outbox: Path) -> tuple[Path, str | None] | None:
    """What a command's TARGET names: a case id (its latest version), a case folder (its
    latest) or a version folder. Returns the version folder with, for a case id, the id
    its result must carry (``check_case``); None where there is no result."""
    path = Path(target)
    by_case_id = not path.exists()
    folder = case_folder(outbox, target) if by_case_id else path
    if not (folder / RESULT_FILE).is_file():
        latest = latest_in(folder)
        if latest is None:
            return None
        folder = latest.path
    return folder, (target if by_case_id else None)


def point_latest_at(case_dir: Path, version: int) -> None:
    """Make ``latest.json`` name ``v<version>`` (atomically)."""
    write_json_atomic(case_dir / LATEST_FILE, {"version": version, "path": f"v{version}"})


@contextlib.contextmanager
def _case_lock(case_dir: Path) -> Iterator[None]:
    """One writer of a case's versions at a time (the service's worker, a sign-off)."""
    fd = os.open(case_dir, os.O_RDONLY | os.O_DIRECTORY)  # the folder itself: no lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_case_result(
    outbox: Path, content: CaseContent, *, write_pdf: bool = True
) -> tuple[ResultFolder, CaseResult]:
    """Write version N+1 of a case's result and point latest.json at it."""
    case_id = content.result.case_id
    case_dir = case_folder(outbox, case_id)
    case_dir.mkdir(parents=True, exist_ok=True)
    with _case_lock(case_dir):
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=case_dir))
        try:
            group_readable(staging)
            version = (existing_versions(case_dir) or [0])[-1] + 1
            result = _write_version_files(staging, version, content, write_pdf)
            final, result = _rename_into_place(staging, case_dir, result)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        point_latest_at(case_dir, result.version)
    log.info("result written", extra={"case": case_id, "version": result.version})
    return ResultFolder(case_dir, result.version, final), result


def write_reviewed_version(
    version_folder: Path, review: ReviewRecord, *, write_pdf: bool = True
) -> tuple[ResultFolder, CaseResult]:
    """Version N+1 of a case: version N's files, its result with ``review`` added, and the
    report printed again. Refused (ResultWriteError) unless version N is still the latest:
    a sign-off is of the result the reviewer saw."""
    source = read_result(version_folder)
    case_dir = version_folder.parent
    with _case_lock(case_dir):
        newest = (existing_versions(case_dir) or [0])[-1]
        if newest != source.version:
            raise ResultWriteError(
                f"case {source.case_id} has a newer result (version {newest}) than the one "
                f"reviewed (version {source.version}); review the newer one"
            )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=case_dir))
        try:
            group_readable(staging)
            _carry_over(version_folder, staging)
            result = dataclasses.replace(source, version=source.version + 1, review=review)
            result = _write_report_and_result(staging, result, write_pdf)
            final = case_dir / f"v{result.version}"
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        point_latest_at(case_dir, result.version)
    log.info("reviewed version written", extra={"case": source.case_id, "version": result.version})
    return ResultFolder(case_dir, result.version, final), result


def _carry_over(source: Path, target: Path) -> None:
    """Every file of a version but its result and report, hard-linked where the file system
    allows (versions are never edited, so sharing their bytes is safe), else copied."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(
        source,
        target,
        dirs_exist_ok=True,
        copy_function=link_or_copy,
        ignore=lambda folder, names: [
            n for n in names if Path(folder) == source and n in REPORT_FILES
        ],
    )


def _rename_into_place(
    staging: Path, case_dir: Path, result: CaseResult
) -> tuple[Path, CaseResult]:
    # Two writers racing for the same N: the loser takes the next free number.
    for _ in range(100):
        final = case_dir / f"v{result.version}"
        try:
            os.rename(staging, final)  # fails when final exists and is not empty
            return final, result
        except OSError:
            if not final.exists():
                raise
            result = dataclasses.replace(result, version=existing_versions(case_dir)[-1] + 1)
            write_json_atomic(staging / RESULT_FILE, result.to_json())
    raise ResultWriteError(f"could not find a free version number in {case_dir}")


def _write_version_files(
    folder: Path, version: int, content: CaseContent, write_pdf: bool
) -> CaseResult:
    """Every file of the version; returns the result as written to result.json."""
    scans = {scan.slide_id: scan for scan in content.result.scans}
    for slide in content.slides:
        rel = Path("slides") / unique_name(slide.slide_id)
        files = SlideOutputs(
            thumbnail=str(rel / "thumbnail.png"),
            heatmap=str(rel / "heatmap.png"),
            cells_csv=str(rel / "cells.csv"),
            cells_geojson=str(rel / "cells.geojson"),
        )
        write_text_atomic(folder / files.cells_csv, slide.cells_csv)
        write_json_atomic(folder / files.cells_geojson, slide.geojson)
        write_png_atomic(folder / files.thumbnail, Image.fromarray(slide.thumbnail))
        heat = render_heatmap(
            slide.thumbnail, slide.cell_xy / slide.thumbnail_scale, slide.attention
        )
        write_png_atomic(folder / files.heatmap, heat)
        scans[slide.slide_id] = dataclasses.replace(scans[slide.slide_id], outputs=files)

    outputs = CaseOutputs(report_html="report.html", cells_geojson="cells.geojson")
    write_json_atomic(
        folder / outputs.cells_geojson, merge_geojson([s.geojson for s in content.slides])
    )
    if content.embeddings:
        outputs = dataclasses.replace(outputs, embeddings="embeddings.npz")
        write_npz_atomic(folder / "embeddings.npz", content.embeddings)
    if content.patient_embedding is not None:
        outputs = dataclasses.replace(outputs, patient_embedding=PATIENT_EMBEDDING_FILE)
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(content.patient_embedding, np.float32))
        write_bytes_atomic(folder / PATIENT_EMBEDDING_FILE, buffer.getvalue())
    if content.gallery_patches:
        # One crop per top cell (rank order), for the window's enlarged view.
        for cell, patch in zip(content.result.top_cells, content.gallery_patches, strict=True):
            write_png_atomic(folder / cell.image, Image.fromarray(np.asarray(patch)))
        gallery = render_gallery(content.gallery_patches, content.gallery_captions)
        write_png_atomic(folder / "gallery.png", gallery)
        outputs = dataclasses.replace(outputs, gallery="gallery.png")
    # Classified cells by class and the unsure ones: the window's galleries, re-labelling.
    for cell, patch in zip(content.result.cell_gallery, content.cell_gallery_patches, strict=True):
        write_png_atomic(folder / cell.image, Image.fromarray(np.asarray(patch)))

    result = dataclasses.replace(
        content.result,
        version=version,
        scans=tuple(scans[scan.slide_id] for scan in content.result.scans),
        outputs=outputs,
    )
    return _write_report_and_result(folder, result, write_pdf)


def _write_report_and_result(folder: Path, result: CaseResult, write_pdf: bool) -> CaseResult:
    """The report (HTML, and the PDF when asked and the printer works) and result.json."""
    outputs = dataclasses.replace(result.outputs, report_pdf="report.pdf" if write_pdf else None)
    result = dataclasses.replace(result, outputs=outputs)
    html = render_report_html(result, folder)
    if write_pdf and not write_report_pdf(html, folder, folder / "report.pdf"):
        result = dataclasses.replace(result, outputs=dataclasses.replace(outputs, report_pdf=None))
        html = render_report_html(result, folder)
    write_text_atomic(folder / result.outputs.report_html, html)
    write_json_atomic(folder / RESULT_FILE, result.to_json())
    return result


def merge_geojson(collections: Sequence[dict[str, Any]]) -> dict[str, Any]:
    features: list[Any] = []
    for collection in collections:
        features.extend(collection.get("features", []))
    return {"type": "FeatureCollection", "features": features}
