"""Re-labelling a cell: a reviewer's class for one cell, kept for training, never in the result.

A reviewer who disagrees with the cell head's class of a cell gives it another class of
the head's taxonomy (in the window, from a gallery, by keyboard). The result is not
edited: a result version is never edited, and the call shown was the head's. The
cell's crop is saved in the site's training folder (``paths.training_cells``) as
``<training folder>/<class>/<case>-<slide>-<cell_id>.png``, the class-folder layout
``cytoedge train`` reads, with a sidecar ``.json`` beside it (who, when, from which
result, what the head called it, which bundle), and the audit trail gets a
``relabelled`` line. A cell has one label: re-labelling it again moves its crop to the
new class's folder. docs/cells.md has the loop from review back to training.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.results import (
    CaseResult,
    GalleryCell,
    ResultError,
    TopCell,
    read_result,
    unique_name,
)
from appliance.service.audit import AuditLog
from runtime.files import write_bytes_atomic, write_json_atomic
from runtime.typed_json import dump

CROP_SUFFIX = ".png"
SIDECAR_SUFFIX = ".json"


class RelabelError(RuntimeError):
    """A label that could not be saved; the message is one sentence for the window."""


@dataclass(frozen=True)
class CellLabel:
    """The sidecar of a re-labelled cell's crop: whose class, from which result."""

    cell_class: str  # the reviewer's class, a name of the cell head's taxonomy
    labelled_by: str
    labelled_at: str  # UTC, ISO 8601
    case_id: str
    result_version: int
    slide: str
    cell_id: int
    crop: str  # the crop's path in that result version
    head_class: str | None  # what the cell head called it, how sure, and whether it was sure
    head_confidence: float | None
    head_sure: bool | None
    bundle_name: str
    bundle_version: str
    bundle_sha256: str


@dataclass(frozen=True)
class SavedLabel:
    crop: Path  # <training folder>/<class>/<case>-<slide>-<cell_id>.png
    label: CellLabel
    replaced: tuple[Path, ...]  # the crops of this cell's earlier labels, removed

    @property
    def sidecar(self) -> Path:
        return self.crop.with_suffix(SIDECAR_SUFFIX)


def label_stem(case_id: str, slide: str, cell_id: int) -> str:
    """A cell's file name in the training folder, without its suffix: unique on a site."""
    return unique_name(case_id, slide, str(cell_id))


def class_names(result: CaseResult) -> tuple[str, ...]:
    """The classes a cell of this result may be given: its cell head's taxonomy."""
    return tuple(row.name for row in result.differential.classes) if result.differential else ()


def find_cell(result: CaseResult, slide: str, cell_id: int) -> GalleryCell | TopCell | None:
    """The result's record of a cell with a crop (its galleries first, then its top cells)."""
    for cell in (*result.cell_gallery, *result.top_cells):
        if (cell.slide, cell.cell_id) == (slide, cell_id):
            return cell
    return None


def save_cell_label(
    version_folder: Path,
    slide: str,
    cell_id: int,
    cell_class: str,
    *,
    training_dir: Path,
    audit: AuditLog,
    labelled_by: str,
) -> SavedLabel:
    """Save a reviewer's class of one cell of the result in ``version_folder`` as a
    labelled crop in ``training_dir`` and record it in the audit trail; RelabelError
    says why not (an earlier label of the cell then stays as it was)."""
    try:
        result = read_result(version_folder)
    except ResultError as exc:
        raise RelabelError(f"the result could not be read: {exc}") from None
    if cell_class not in class_names(result):
        raise RelabelError(f"the cell head of case {result.case_id} has no class {cell_class!r}")
    cell = find_cell(result, slide, cell_id)
    if cell is None:
        raise RelabelError(f"cell {cell_id} of slide {slide} has no crop in this result")
    label = CellLabel(
        cell_class=cell_class,
        labelled_by=labelled_by,
        labelled_at=datetime.now(UTC).isoformat(timespec="seconds"),
        case_id=result.case_id,
        result_version=result.version,
        slide=slide,
        cell_id=cell_id,
        crop=cell.image,
        head_class=cell.cell_class,
        head_confidence=cell.confidence,
        head_sure=cell.sure,
        bundle_name=result.bundle.name,
        bundle_version=result.bundle.version,
        bundle_sha256=result.bundle.sha256,
    )
    stem = label_stem(result.case_id, slide, cell_id)
    target = training_dir / cell_class / f"{stem}{CROP_SUFFIX}"
    try:
        crop = (version_folder / cell.image).read_bytes()
    except OSError:
        raise RelabelError(
            f"the crop of cell {cell_id} of slide {slide} is missing from the result folder"
        ) from None
    try:
        # The new label whole first: an earlier one goes only once this one is saved.
        write_bytes_atomic(target, crop)
        write_json_atomic(target.with_suffix(SIDECAR_SUFFIX), dump(label))
        replaced = tuple(_remove_other_labels(training_dir, stem, keep=target))
    except PermissionError:
        raise RelabelError(
            f"no permission to write the training folder {training_dir}: the site gives "
            "the technicians' group write access to it"
        ) from None
    except OSError as exc:
        raise RelabelError(
            f"the label could not be saved in {training_dir}: {exc.strerror or 'write failed'}"
        ) from None
    try:
        audit.record(
            "relabelled",
            case=result.case_id,
            version=result.version,
            slide=slide,
            cell_id=cell_id,
            head_class=cell.cell_class,
            cell_class=cell_class,
            labelled_by=labelled_by,
            crop=str(target),
            bundle_sha256=result.bundle.sha256,
        )
    except OSError as exc:
        raise RelabelError(
            f"the label is saved in {target.parent}, but the audit trail {audit.path} could "
            f"not be written: {exc.strerror or 'write failed'}"
        ) from None
    return SavedLabel(target, label, replaced)


def _remove_other_labels(training_dir: Path, stem: str, *, keep: Path) -> list[Path]:
    """Remove this cell's crops (and sidecars) in other class folders: one label a cell.
    A class folder left empty goes too: `cytoedge train` refuses an empty one."""
    removed = []
    for crop in sorted(training_dir.glob(f"*/{stem}{CROP_SUFFIX}")):
        if crop != keep:
            crop.with_suffix(SIDECAR_SUFFIX).unlink(missing_ok=True)
            crop.unlink(missing_ok=True)
            removed.append(crop)
            if not any(crop.parent.iterdir()):
                crop.parent.rmdir()
    return removed
