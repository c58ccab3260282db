"""A case's result folder as the result pane shows it: the typed result with its files.

``load_result`` follows ``<outbox>/<case>/latest.json`` to ``v<N>/`` and reads its
``result.json`` through the result's own schema (``appliance.results``); the
files it names become paths, and the ones missing on disk become None. No Qt
here: the pane's logic is testable without a screen.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from appliance.results import (
    RESULT_FILE,
    CaseResult,
    GalleryCell,
    ResultError,
    ScanRecord,
    TopCell,
    WrongCaseError,
    check_case,
    latest_in,
    read_result,
)

DEMO_BANNER = "Demo model, not for diagnosis"
TOP_CELLS = "top"  # the gallery's filters: the highest-attention cells, a class, the unsure
UNSURE = "unsure"


class ResultUnreadableError(RuntimeError):
    """No usable result.json at the given place; the message is one line."""


@dataclass(frozen=True)
class SlideView:
    scan: ScanRecord
    heatmap: Path | None
    thumbnail: Path | None
    cells_csv: Path | None

    @property
    def slide_id(self) -> str:
        return self.scan.slide_id

    @property
    def name(self) -> str:
        return self.scan.name

    @property
    def qc_passed(self) -> bool:
        return self.scan.qc.verdict != "fail"


@dataclass(frozen=True)
class CellView:
    """A cell with a crop: one of the highest-attention cells, or a classified cell of
    the cell head's galleries."""

    cell: TopCell | GalleryCell
    image: Path | None

    @property
    def key(self) -> tuple[str, int]:
        return self.cell.slide, self.cell.cell_id


@dataclass(frozen=True)
class GalleryFilter:
    """One choice of the cell gallery's filter: its key (TOP_CELLS, a class name, UNSURE),
    what it says, and the cells it shows in order."""

    key: str
    text: str
    cells: tuple[CellView, ...]


@dataclass(frozen=True)
class CaseView:
    """The result of one version folder, with its files as paths (None when absent)."""

    folder: Path
    result: CaseResult

    def file(self, relative: str | None) -> Path | None:
        if not relative:
            return None
        path = self.folder / relative
        return path if path.exists() else None

    @cached_property
    def slides(self) -> tuple[SlideView, ...]:
        return tuple(
            SlideView(
                scan,
                self.file(scan.outputs.heatmap if scan.outputs else None),
                self.file(scan.outputs.thumbnail if scan.outputs else None),
                self.file(scan.outputs.cells_csv if scan.outputs else None),
            )
            for scan in self.result.scans
        )

    @cached_property
    def top_cells(self) -> tuple[CellView, ...]:
        return tuple(CellView(cell, self.file(cell.image)) for cell in self.result.top_cells)

    @cached_property
    def gallery_cells(self) -> tuple[CellView, ...]:
        """The cell head's crops: each class's surest cells, then the unsure ones."""
        return tuple(CellView(cell, self.file(cell.image)) for cell in self.result.cell_gallery)

    @cached_property
    def class_labels(self) -> dict[str, str]:
        """The cell head's classes, name to label, in the taxonomy's order."""
        found = self.result.differential
        return {row.name: row.label for row in found.classes} if found else {}

    def gallery_filters(self) -> tuple[GalleryFilter, ...]:
        """The highest-attention cells (all classes; none when no head attends to cells),
        each class with crops (the surest first), and the unsure cells (the least sure
        first), each with its crops out of the case's cells."""
        top = GalleryFilter(
            TOP_CELLS, f"Highest attention, all classes ({len(self.top_cells)})", self.top_cells
        )
        found = self.result.differential
        if found is None:
            return (top,)
        # A scored case without top cells was called by a probe on its patient
        # embedding, which attends to no cell: its gallery opens on the classes.
        attended = bool(self.top_cells) or self.result.status != "scored"
        choices = [top] if attended else []
        for row in found.classes:
            cells = tuple(
                c for c in self.gallery_cells if c.cell.sure and c.cell.cell_class == row.name
            )
            if cells:
                text = f"{row.label} ({len(cells)} of {row.count})"
                choices.append(GalleryFilter(row.name, text, cells))
        unsure = tuple(c for c in self.gallery_cells if not c.cell.sure)
        if unsure:
            choices.append(
                GalleryFilter(UNSURE, f"Unsure ({len(unsure)} of {found.unsure})", unsure)
            )
        return tuple(choices) or (top,)

    @property
    def report(self) -> Path | None:
        outputs = self.result.outputs
        return self.file(outputs.report_pdf) or self.file(outputs.report_html)

    @property
    def gallery(self) -> Path | None:
        return self.file(self.result.outputs.gallery)

    def banners(self) -> list[tuple[str, str]]:
        """(kind, text) messages that must not be missed, most important first."""
        result = self.result
        found: list[tuple[str, str]] = []
        if result.status == "rejected":
            found.append(("rejected", f"Rejected: {result.abstain_reason or 'scan not usable'}"))
        elif result.status == "abstained":
            found.append(("abstained", f"No call: {result.abstain_reason or 'model abstained'}"))
        if result.is_demo:
            found.append(("demo", DEMO_BANNER))
        if result.bundle.signature_warning:
            found.append(("unsigned", result.bundle.signature_warning.capitalize()))
        return found


def resolve_version_folder(path: Path) -> Path:
    """A version folder from itself, its case folder (via latest.json) or a result.json."""
    if path.is_file() and path.name == RESULT_FILE:
        return path.parent
    if (path / RESULT_FILE).is_file():
        return path
    latest = latest_in(path)
    if latest is None:
        raise ResultUnreadableError(f"no result in {path}")
    return latest.path


def load_result(path: Path, case_id: str | None = None) -> CaseView:
    """Read a result version folder (or a case folder, following latest.json); with
    ``case_id``, a result of any other case is refused."""
    folder = resolve_version_folder(path)
    try:
        result = read_result(folder)
        if case_id is not None:
            check_case(result.case_id, case_id, folder)
    except (ResultError, WrongCaseError) as exc:
        raise ResultUnreadableError(str(exc)) from None
    return CaseView(folder, result)


def cell_measurements(cells_csv: Path, cell_ids: set[int]) -> dict[int, dict[str, str]]:
    """The rows of a slide's cell table for some cells, by cell id (one read of the
    table; a cell not found, or a table not readable, has no row)."""
    wanted = {str(cell_id) for cell_id in cell_ids}
    rows: dict[int, dict[str, str]] = {}
    try:
        with cells_csv.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("cell_id") in wanted:
                    rows[int(row["cell_id"])] = {k: v for k, v in row.items() if k is not None}
    except OSError:
        return {}
    return rows
