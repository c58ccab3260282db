"""A cell head trained on labelled cells (CytoDINO's recipe): the loss smooths toward lineage
siblings and charges critical confusions, the folds never split a group, and real BCCD
crops in class folders become a new bundle version whose cell head loads and classifies,
through the command as a site runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.pipeline.networks import SlideNetworks
from appliance.validation.cohort import PipelineSettings
from appliance.validation.labelled_cells import read_labelled_cells
from export.cell_loss import CellLoss, critical_penalties, sibling_targets
from export.folds import grouped_folds
from export.train_cells import CellOptions, train_cell_head
from export.train_run import TrainingError
from runtime.backends import RuntimeSettings
from runtime.bundle_format import load_bundle
from runtime.heads import CellHeadRunner
from runtime.taxonomy import load_taxonomy
from tests.runtime_models import TinyBundle
from tests.test_labelled_cells import bccd_class_folders, bccd_taxonomy


def test_smoothing_mass_goes_to_the_lineage_siblings_only() -> None:
    taxonomy = load_taxonomy("rbc-morphology")
    targets = sibling_targets(taxonomy, 0.1)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0)
    for index, name in enumerate(taxonomy.names):
        siblings = [taxonomy.index(s) for s in taxonomy.siblings(name)]
        others = [i for i in range(len(taxonomy.names)) if i != index and i not in siblings]
        assert targets[index, others].sum() == 0.0
        if siblings:  # the true class keeps 1 - epsilon, its siblings share epsilon
            assert targets[index, index] == pytest.approx(0.9)
            np.testing.assert_allclose(targets[index, siblings], 0.1 / len(siblings))
        else:  # no sibling: a plain one-hot target
            assert targets[index, index] == 1.0
    # Macrocyte and microcyte share the lineage ("erythroid", "size"); normal cells have none.
    assert taxonomy.siblings("macrocyte") and not taxonomy.siblings("normal_cell")


def _loss_with_mass_on(taxonomy_name: str, true: str, called: str) -> float:
    """The loss of one cell of class ``true`` whose head gives ``called`` 0.7 and spreads the
    rest evenly: the same probabilities whatever ``called`` is."""
    taxonomy = load_taxonomy(taxonomy_name)
    count = len(taxonomy.names)
    p = np.full(count, 0.3 / (count - 1))
    p[taxonomy.index(called)] = 0.7
    logits = torch.from_numpy(np.log(p)[None].astype(np.float32))
    truth = torch.tensor([taxonomy.index(true)])
    return float(CellLoss(taxonomy)(logits, truth))


def test_a_critical_confusion_costs_more_than_an_equal_harmless_one() -> None:
    taxonomy = load_taxonomy("pb-wbc")
    [confusion, *_] = taxonomy.critical
    true, critical = confusion.true, confusion.predicted[0]
    harmless = next(
        name
        for name in taxonomy.names
        if name != true
        and not taxonomy.is_critical(true, name)
        and name not in taxonomy.siblings(true)
        and critical not in taxonomy.siblings(true)
    )
    assert critical_penalties(taxonomy)[taxonomy.index(true), taxonomy.index(critical)] > 0
    dangerous = _loss_with_mass_on("pb-wbc", true, critical)
    assert dangerous > _loss_with_mass_on("pb-wbc", true, harmless) + 0.5


def test_calling_a_sibling_costs_less_than_calling_across_lineages() -> None:
    sibling = _loss_with_mass_on("rbc-morphology", "macrocyte", "microcyte")
    across = _loss_with_mass_on("rbc-morphology", "macrocyte", "teardrop")
    assert sibling < across


def test_a_taxonomy_restricted_to_the_trained_classes_keeps_their_confusions() -> None:
    taxonomy = load_taxonomy("pb-wbc")
    [confusion, *_] = taxonomy.critical
    kept = (confusion.predicted[0], confusion.true, "lymphocyte")
    restricted = taxonomy.restricted(kept)
    assert restricted.names == kept  # the head's output order
    assert restricted.is_critical(confusion.true, confusion.predicted[0])
    assert all({c.true, *c.predicted} <= set(kept) for c in restricted.critical)
    assert all(set(members) <= set(kept) and members for members in restricted.groups.values())
    restricted.validate("restricted")


def test_grouped_folds_never_split_a_group_and_keep_every_class_in_play() -> None:
    rng = np.random.default_rng(3)
    groups = [f"image-{i}" for i in rng.integers(0, 40, size=2000)]
    classes = rng.integers(0, 6, size=2000)
    folds = grouped_folds(classes, groups, 5, seed=1)
    for group in set(groups):
        assert len(set(folds[[g == group for g in groups]])) == 1, group
    assert set(folds) == set(range(5))
    for fold in range(5):
        assert set(classes[folds != fold]) == set(range(6))  # each member sees every class


@pytest.fixture
def bccd(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(BCCD class folders, their taxonomy file, a bundle to train from)."""
    root = bccd_class_folders(tmp_path / "crops")
    bccd_taxonomy(tmp_path)
    tiny = TinyBundle(tmp_path / "tiny")
    tiny.write()
    return root, tmp_path / "bccd-boxes.json", tiny.path


def test_bccd_crops_train_a_cell_head_that_loads_and_classifies(
    bccd: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, taxonomy_file, base_path = bccd
    base = load_bundle(base_path)
    with SlideNetworks(base) as networks:
        pipeline = PipelineSettings(tmp_path / "cache", RuntimeSettings())
        cells = read_labelled_cells(
            root, load_taxonomy(taxonomy_file), networks, pipeline, Console()
        )
    made = train_cell_head(
        cells,
        base,
        Console(),
        destination=tmp_path / "v2",
        version="2",
        source=root.name,
        options=CellOptions(folds=3, seed=0),
    )
    bundle = load_bundle(tmp_path / "v2")
    head = bundle.cell_head
    assert head is not None and head.kind == "cell_classifier" and len(head.files) == 3
    assert bundle.cell_classes == ("wbc", "rbc", "platelet")
    assert [h.name for h in bundle.heads] == [h.name for h in base.heads]  # case heads kept
    figures = made.figures
    assert head.thresholds["confidence"] == figures.operating_point.confidence
    assert head.extra["coverage"] == figures.operating_point.coverage
    recall = {c.name: c.recall for c in figures.classes}
    # Loose: a white cell is not a red cell even to a colour-mean encoder.
    assert recall["wbc"] >= 0.5 and recall["rbc"] >= 0.9, recall

    # Served: the ensemble of the exported members, calibrated, classifies the crops.
    runner = CellHeadRunner(bundle)
    probabilities = runner.probabilities(cells.embeddings)
    calls = head.head_kind.classify(head, probabilities)
    truth = np.array([bundle.cell_classes.index(label) for label in cells.labels])
    assert probabilities.shape == (len(cells), 3)
    assert (calls.classes == truth).mean() > 0.8

    training = bundle.provenance["cell_training"]
    assert training["cells_per_class"] == cells.class_counts()
    assert training["how"] == {"crop": len(cells)}
    assert training["out_of_fold"]["macro_f1"] == pytest.approx(figures.macro_f1)
    assert training["operating_point"]["coverage"] == figures.operating_point.coverage
    assert training["taxonomy"] == "bccd-boxes" and training["seed"] == 0
    assert len(training["epochs_run"]) == 3 and len(training["parity"]) == 3


def test_a_class_too_rare_for_the_folds_is_left_out_and_the_taxonomy_restricted(
    bccd: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, taxonomy_file, base_path = bccd
    base = load_bundle(base_path)
    with SlideNetworks(base) as networks:
        pipeline = PipelineSettings(tmp_path / "cache", RuntimeSettings())
        cells = read_labelled_cells(
            root, load_taxonomy(taxonomy_file), networks, pipeline, Console()
        )
    platelets = cells.class_counts()["platelet"]
    made = train_cell_head(
        cells,
        base,
        Console(),
        destination=tmp_path / "v2",
        version="2",
        source=root.name,
        options=CellOptions(folds=platelets + 1),
    )
    assert set(made.left_out) == {"platelet"}
    assert f"{platelets} cells" in made.left_out["platelet"]
    assert made.bundle.cell_classes == ("wbc", "rbc")
    wbc = cells.class_counts()["wbc"]
    with pytest.raises(TrainingError, match="a cell head needs two classes, and 1 can"):
        train_cell_head(
            cells,
            base,
            Console(),
            destination=tmp_path / "v3",
            version="3",
            source=root.name,
            options=CellOptions(folds=wbc + 1),  # the red cells alone have enough
        )


def test_fewer_groups_than_folds_cannot_be_cross_validated(
    bccd: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, taxonomy_file, base_path = bccd
    two = tmp_path / "two-groups"
    for index, photo in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for crop in photo.glob("*/*.png"):
            target = two / f"group-{index % 2}" / crop.parent.name / f"{photo.name}-{crop.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(crop.read_bytes())
    base = load_bundle(base_path)
    with SlideNetworks(base) as networks:
        pipeline = PipelineSettings(tmp_path / "cache", RuntimeSettings())
        cells = read_labelled_cells(
            two, load_taxonomy(taxonomy_file), networks, pipeline, Console()
        )
    with pytest.raises(TrainingError, match=r"2 groups .* 3-fold training needs at least 3"):
        train_cell_head(
            cells,
            base,
            Console(),
            destination=tmp_path / "v2",
            version="2",
            source=two.name,
            options=CellOptions(folds=3),
        )


def test_the_command_trains_a_cell_head_and_writes_its_out_of_fold_figures(
    bccd: tuple[Path, Path, Path], tmp_path: Path, isolated_data_dir: Path
) -> None:
    root, taxonomy_file, base_path = bccd
    args = ["train", str(root), "--bundle", str(base_path), "--folds", "3"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--taxonomy" in refused.output
    result = CliRunner().invoke(app, [*args, "--taxonomy", str(taxonomy_file), "--version", "5"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "84 crops of class folders" in text or "crops of class folders" in text
    assert "macro F1" in text and "weighted F1" in text and "Critical errors" in text
    assert "Operating point: confidence" in text
    made = isolated_data_dir / "bundles" / "tiny-5"
    assert str(made) in text and load_bundle(made).cell_head is not None
    report = isolated_data_dir / "validation" / "tiny-5" / "training"
    dumped = json.loads((report / "report.json").read_text())["cells"]["figures"]
    assert dumped["taxonomy"] == "bccd-boxes" and dumped["cells"] == len(list(root.glob("*/*/*")))
    assert "operating_point" in dumped and "confusion" in dumped
    assert (report / "report.html").is_file() and (report / "cell-confusion.png").is_file()
