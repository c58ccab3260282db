"""``cytoedge train CASES --bag-classes``: the case heads learn on the bags they will score
(the kept cells the cell head puts in those classes, the scan visited until its budget of
them), a case with too few of them is left out with the reason, and ``cytoedge validate``
scores each case on the very bag training took; a base without a cell head, or a class
it does not know, is refused with one line."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.config import load_config
from appliance.pipeline.networks import SlideNetworks
from appliance.validation.cases_table import read_cases_table
from appliance.validation.cohort import PipelineSettings, process_cohort
from export.train_run import TrainingError, bag_classes_of, case_bag
from runtime.backends import RuntimeSettings
from runtime.bundle_format import load_bundle
from tests.cell_head_bundle import TWO_CLASSES, with_cell_head
from tests.runtime_models import TinyBundle

PLASMA = ("plasma_cell",)
BUDGET = 40  # kept cells a slide's visit is after; a tile holds about 80


def test_bag_classes_need_a_cell_head_that_knows_them(tmp_path: Path) -> None:
    tiny = TinyBundle(tmp_path / "tiny")
    without = tiny.write()
    with pytest.raises(TrainingError, match="has no cell head"):
        bag_classes_of(without, "plasma_cells")

    reference = np.random.default_rng(0).normal(size=(64, tiny.dim)).astype(np.float32)
    with_head = with_cell_head(tiny.path, tmp_path / "with-head", reference)
    assert bag_classes_of(with_head, "plasma_cells") == PLASMA  # a group of its taxonomy
    assert bag_classes_of(with_head, "other_cell, plasma_cell") == TWO_CLASSES.names
    with pytest.raises(TrainingError, match="blast") as refused:
        bag_classes_of(with_head, "plasma_cell,blast")
    assert "\n" not in str(refused.value) and "plasma_cells" in str(refused.value)

    scan = tmp_path / "MM-1.tif"
    scan.write_bytes(b"not read: the option is refused first")
    table = tmp_path / "cases.csv"
    table.write_text("case_id,scans,del(17p)\nMM-1,MM-1.tif,1\n", encoding="utf-8")
    for bundle, option, said in (
        (tiny.path, "plasma_cells", "has no cell head"),
        (with_head.path, "blasts", "neither a group"),
    ):
        args = ["train", str(table), "--bundle", str(bundle), "--bag-classes", option]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and said in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def myeloma_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic myeloma smears of 4 tiles each, as the demo writes them: its table."""
    from cytoedge_demo.cohort import CohortSizes, write_cohorts

    root = tmp_path_factory.mktemp("cohort")
    sizes = CohortSizes(
        mm_cases={"train": 4, "holdout": 0},
        pb_patients={"train": 0, "holdout": 0},
        pb_cells=0,
        slide_px=1200,
        nucleated_per_mm2=2400.0,
        plasma_fraction=0.5,
        seed=11,
    )
    table = write_cohorts(root, sizes, lambda fraction: None)["train"]
    with open(table, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # The scans by absolute path: validation reads the table from elsewhere too.
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "scans": str(root / row["scans"])} for row in rows)
    return table


@pytest.mark.slow
def test_training_and_validation_take_the_same_bag(
    tiny_bundle: Path, myeloma_cohort: Path, tmp_path: Path, isolated_data_dir: Path
) -> None:
    table = read_cases_table(myeloma_cohort)
    with SlideNetworks(load_bundle(tiny_bundle)) as networks:
        first = process_cohort(
            table,
            networks,
            PipelineSettings(tmp_path / "c", RuntimeSettings()),
            Console(),
            cases=table.cases[:1],
        )
    reference = first[0].slides[0].cells().embeddings
    # A slide budget the first tile's kept cells reach before its plasma cells do: a visit
    # counted in plasma cells (the new version's) goes on where one counting every kept
    # cell (the base's) stops, so a bag taken on the base's visit would be another.
    base = with_cell_head(tiny_bundle, tmp_path / "base", reference, budget_per_slide=BUDGET)
    assert base.budget_classes("scans") == ()

    args = ["train", str(myeloma_cohort), "--bundle", str(base.path), "--folds", "2"]
    result = CliRunner().invoke(app, [*args, "--bag-classes", "plasma_cells", "--version", "9"])
    assert result.exit_code == 0, result.output
    made = load_bundle(isolated_data_dir / "bundles" / f"{base.name}-9")
    assert made.head("myeloma").bag_classes == PLASMA
    assert made.budget_classes("scans") == PLASMA
    training = made.provenance["training"]["heads"]["myeloma"]
    assert training["bag_classes"] == list(PLASMA)
    bag_cells = training["bag_cells"]
    assert set(bag_cells) == {case.case_id for case in table.cases}

    # Validation scores each case as the service does: its bag is the one training took.
    report = tmp_path / "report"
    args = ["validate", str(made.path), str(myeloma_cohort), "--report", str(report)]
    result = CliRunner().invoke(app, [*args, "--resamples", "100"])
    assert result.exit_code == 0, result.output
    pipeline = PipelineSettings.from_config(load_config(None))
    with SlideNetworks(made) as networks:
        cohort = process_cohort(table, networks, pipeline, Console())
    assert all(slide.from_cache for case in cohort for slide in case.slides)
    beyond_budget = 0
    for case in cohort:
        folder = report / "cases" / case.case_id
        version = folder / json.loads((folder / "latest.json").read_text())["path"]
        scored = json.loads((version / "result.json").read_text())
        assert sum(s["cells"] for s in scored["scans"]) == bag_cells[case.case_id]
        with np.load(version / "embeddings.npz") as saved:
            np.testing.assert_array_equal(saved["embeddings"], case.bag(made, PLASMA))
        [scan] = scored["scans"]
        assert scan["examined"]["budget_classes"] == list(PLASMA)
        with open(version / "slides" / scan["slide_id"] / "cells.csv", encoding="utf-8") as f:
            tiles = [row["tile_id"] for row in csv.DictReader(f)]  # in the visit's order
        # Counting every kept cell, the visit adds no cell after the tile that reaches BUDGET.
        beyond_budget += tiles[-1] != tiles[min(BUDGET, len(tiles)) - 1]
    assert beyond_budget, "a visit counted in plasma cells went on past that tile"

    # A case whose bag holds fewer cells than the bundle needs is left out, as scoring
    # would abstain, with scoring's reason.
    case = cohort[0]
    bag, reason = case_bag(case, made, PLASMA)
    assert reason is None and len(bag) == bag_cells[case.case_id]
    stricter = dataclasses.replace(
        made, cells=dataclasses.replace(made.cells, min_cells=len(bag) + 1)
    )
    _, reason = case_bag(case, stricter, PLASMA)
    assert reason == (
        f"too few cells: {len(bag)} plasma cells (the bundle needs at least {len(bag) + 1})"
    )
