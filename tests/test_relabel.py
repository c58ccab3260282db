"""Re-labelling a cell (appliance.review.relabel): the reviewer's class saved as a crop in
the site's training folder, in the class-folder layout `cytoedge train` reads, with a
sidecar and an audit line; one label a cell; the result never edited; a label that
cannot be saved says why in a sentence and leaves the earlier one as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from appliance.results import read_result
from appliance.review.relabel import (
    CellLabel,
    RelabelError,
    class_names,
    label_stem,
    save_cell_label,
)
from appliance.service.audit import AuditLog, read_audit
from appliance.validation.cell_layouts import CLASS_FOLDERS, read_plan
from cytoedge_demo.samples import write_sample_result
from runtime.taxonomy import load_taxonomy
from runtime.typed_json import parse_section
from tests.cell_results import write_differential_case
from tests.conftest import assert_technician_reason

CASE = "MM-2611-0420"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    two = load_taxonomy("marrow-mll").restricted(("plasma_cell", "other_cell"))
    return write_differential_case(tmp_path / "outbox", CASE, two, (97, 318), 23).path


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_label_is_the_crop_in_its_class_folder_with_a_sidecar_and_an_audit_line(
    folder: Path, tmp_path: Path
) -> None:
    result = read_result(folder)
    cell = next(g for g in result.cell_gallery if not g.sure)
    before = digest(folder.parent)
    training = tmp_path / "training" / "cells"
    audit = AuditLog(tmp_path / "audit.jsonl", source="test")
    saved = save_cell_label(
        folder, cell.slide, cell.cell_id, "plasma_cell",
        training_dir=training, audit=audit, labelled_by="Ana Reviewer",
    )  # fmt: skip
    # <root>/<class>/<case>-<slide>-<cell_id>.png: the class-folder layout.
    assert saved.crop == training / "plasma_cell" / f"{CASE}-{cell.slide}-{cell.cell_id}.png"
    assert saved.crop.read_bytes() == (folder / cell.image).read_bytes()
    label = parse_section(CellLabel, json.loads(saved.sidecar.read_text()), "")
    assert label == saved.label
    assert (label.cell_class, label.labelled_by, label.case_id) == (
        "plasma_cell", "Ana Reviewer", CASE
    )  # fmt: skip
    assert (label.head_class, label.head_confidence, label.head_sure) == (
        cell.cell_class, cell.confidence, False
    )  # fmt: skip
    assert (label.result_version, label.crop) == (result.version, cell.image)
    assert label.bundle_sha256 == result.bundle.sha256
    (line,) = read_audit(audit.path)
    assert line["event"] == "relabelled" and line["labelled_by"] == "Ana Reviewer"
    assert (line["head_class"], line["cell_class"]) == (cell.cell_class, "plasma_cell")
    assert digest(folder.parent) == before  # the result folder is never edited


def test_a_second_label_of_a_cell_replaces_the_first(folder: Path, tmp_path: Path) -> None:
    cell = read_result(folder).cell_gallery[0]
    training = tmp_path / "training"
    audit = AuditLog(tmp_path / "audit.jsonl")
    first = save_cell_label(
        folder, cell.slide, cell.cell_id, "other_cell",
        training_dir=training, audit=audit, labelled_by="a",
    )  # fmt: skip
    second = save_cell_label(
        folder, cell.slide, cell.cell_id, "plasma_cell",
        training_dir=training, audit=audit, labelled_by="b",
    )  # fmt: skip
    assert second.replaced == (first.crop,)
    stem = label_stem(CASE, cell.slide, cell.cell_id)
    assert sorted(p.relative_to(training).as_posix() for p in training.rglob("*.*")) == [
        f"plasma_cell/{stem}.json",
        f"plasma_cell/{stem}.png",
    ]
    assert [e["cell_class"] for e in read_audit(audit.path)] == ["other_cell", "plasma_cell"]
    assert not (training / "other_cell").exists()  # emptied: `cytoedge train` refuses one


def test_the_training_folder_is_the_class_folder_layout_cytoedge_train_reads(
    folder: Path, tmp_path: Path
) -> None:
    result = read_result(folder)
    training = tmp_path / "training" / "cells"
    audit = AuditLog(tmp_path / "audit.jsonl")
    sure = [g for g in result.cell_gallery if g.sure]
    for cell in sure:  # each sure crop under the other class: the reviewer disagrees
        other = "other_cell" if cell.cell_class == "plasma_cell" else "plasma_cell"
        save_cell_label(
            folder, cell.slide, cell.cell_id, other,
            training_dir=training, audit=audit, labelled_by="a",
        )  # fmt: skip
    taxonomy = load_taxonomy("marrow-mll").restricted(("plasma_cell", "other_cell"))
    plan = read_plan(training, taxonomy)  # what `cytoedge train` checks before it embeds
    assert plan.layout == CLASS_FOLDERS
    counts = {f.cell_class: f.crops for f in plan.folders}
    assert counts == {
        "other_cell": sum(g.cell_class == "plasma_cell" for g in sure),
        "plasma_cell": sum(g.cell_class == "other_cell" for g in sure),
    }


def test_a_label_that_cannot_be_saved_says_why_and_leaves_the_earlier_one(
    folder: Path, tmp_path: Path
) -> None:
    cell = read_result(folder).cell_gallery[0]
    training = tmp_path / "training"
    audit = AuditLog(tmp_path / "audit.jsonl")
    first = save_cell_label(
        folder, cell.slide, cell.cell_id, "plasma_cell",
        training_dir=training, audit=audit, labelled_by="a",
    )  # fmt: skip
    (training / "other_cell").write_text("a file where a class folder should be")
    with pytest.raises(RelabelError) as refused:
        save_cell_label(
            folder, cell.slide, cell.cell_id, "other_cell",
            training_dir=training, audit=audit, labelled_by="b",
        )  # fmt: skip
    assert_technician_reason(str(refused.value))
    assert first.crop.is_file() and first.sidecar.is_file()  # nothing lost
    assert len(read_audit(audit.path)) == 1


@pytest.mark.parametrize(
    ("cell_class", "cell_id", "said"),
    [
        ("blast", None, "the cell head of case MM-2611-0420 has no class 'blast'"),
        ("plasma_cell", -1, "cell -1 of slide s1 has no crop in this result"),
    ],
    ids=["a class the head does not know", "a cell without a crop"],
)
def test_what_the_result_does_not_hold_is_refused_in_a_sentence(
    folder: Path, tmp_path: Path, cell_class: str, cell_id: int | None, said: str
) -> None:
    cell = read_result(folder).cell_gallery[0]
    with pytest.raises(RelabelError) as refused:
        save_cell_label(
            folder, "s1", cell.cell_id if cell_id is None else cell_id, cell_class,
            training_dir=tmp_path / "t", audit=AuditLog(tmp_path / "audit.jsonl"),
            labelled_by="a",
        )  # fmt: skip
    assert str(refused.value) == said
    assert_technician_reason(said)
    assert not (tmp_path / "t").exists()


def test_a_result_without_a_cell_head_has_no_class_to_give(tmp_path: Path) -> None:
    folder = write_sample_result(tmp_path, "MM-1", "mm_positive").path
    result = read_result(folder)
    assert class_names(result) == ()
    top = result.top_cells[0]
    with pytest.raises(RelabelError, match="the cell head of case MM-1 has no class"):
        save_cell_label(
            folder, top.slide, top.cell_id, "plasma_cell",
            training_dir=tmp_path / "t", audit=AuditLog(tmp_path / "audit.jsonl"),
            labelled_by="a",
        )  # fmt: skip
