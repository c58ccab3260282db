"""The console tables at 80 columns (a terminal's default): a task's or a network's name is
never cut; other columns wrap or fold instead."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from rich.console import Console

from appliance.cli.score_command import ScoreRun, print_table
from appliance.pipeline.cases import ScoredCase
from appliance.results import read_result
from appliance.site.backend_check import Measurement, SelfTestReport
from appliance.site.doctor import self_test_table
from appliance.validation.measures import (
    CaseLine,
    TaskFigures,
    ValidationReport,
    ValueFigures,
    proportion,
)
from appliance.validation.summary import print_summary
from cytoedge_demo.samples import write_sample_result
from runtime.taxonomy import load_taxonomy
from tests.cell_results import MARROW_COUNTS, write_differential_case

TASK_NAMES = ("del(17p)", "t(4;14)", "t(11;14)", "gain(1q)", "acute leukemia", "hemoglobin")


def rendered(draw: object) -> list[str]:
    out = io.StringIO()
    assert callable(draw)
    draw(Console(file=out, width=80, color_system=None))
    assert "…" not in out.getvalue()  # nothing ellipsised
    return out.getvalue().splitlines()


def fits(lines: list[str]) -> bool:
    return all(len(line) <= 80 for line in lines)


def whole(name: str, lines: list[str]) -> bool:
    return any(name in line for line in lines)


def task(head: str, name: str) -> TaskFigures:
    p = proportion(37, 41)
    return TaskFigures(
        head=head,
        task=name,
        label=name,
        threshold=0.5,
        band=0.05,
        labelled=1208,
        positives=377,
        scored=1190,
        not_scored=18,
        indeterminate=112,
        auc=0.874,
        auc_low=0.801,
        auc_high=0.932,
        sensitivity=p,
        specificity=p,
        ppv=p,
        npv=p,
        ece=0.041,
        roc=(),
        reliability=(),
        scores=(),
        truth=(),
    )


def test_the_validation_summary_keeps_every_task_name_whole() -> None:
    tasks = tuple(task("myeloma", name) for name in TASK_NAMES)
    report = ValidationReport(
        kind="out-of-fold",
        created="2026-06-12T05:00:00+00:00",
        bundle_name="mm-pb-risk",
        bundle_version="12",
        bundle_sha256="0" * 64,
        intended_use="research",
        cases_table="holdout.csv",
        cases_table_sha256="1" * 64,
        cases=1208,
        bootstrap_resamples=2000,
        seed=0,
        tasks=(*tasks, task("peripheral-blood", "malignancy")),
        classes=(),
        values=(ValueFigures("peripheral-blood", "hb", "hemoglobin", 40, 38, 1.23),),
        not_scored=(CaseLine("PB-0001", "abstained", "too few cells: 9 (at least 50)"),),
        lost_scans=(),
    )
    lines = rendered(lambda console: print_summary(report, console))
    assert fits(lines)
    for name in (*TASK_NAMES, "malignancy"):
        row = next(line for line in lines if line.lstrip().startswith(name))
        assert "0.874" in row and "0.80-0.93" in row, row  # AUC and its interval on its row


def test_the_score_table_keeps_every_task_and_class_name_whole(tmp_path: Path) -> None:
    run = ScoreRun()
    for kind, case_id in (
        ("mm_positive", "MM-2611-0416-second-opinion"),
        ("pb", "PB-2611-0101"),
        ("abstained", "MM-2611-0417"),
    ):
        folder = write_sample_result(tmp_path / "a" / "long" / "outbox", case_id, kind, seed=1)
        run.cases.append(ScoredCase(read_result(folder.path), folder, ()))
    run.rejected.append((Path("smear-2611-0418-b.svs"), "the file is truncated: copy it again"))
    lines = rendered(lambda console: print_table(run, console))
    assert fits(lines[: -len(run.cases)])  # the folders below the table are printed whole
    labels = {p.label for case in run.cases for head in case.result.heads for p in head.predictions}
    assert {"del(17p)", "t(11;14)", "malignancy"} <= labels
    for name in (*labels, "acute leukemia", "Hemoglobin"):
        assert whole(name, lines), name
    for case in run.cases:  # each result folder whole on a line of its own, to copy
        assert whole(str(case.folder.path), [line.strip() for line in lines])


def test_the_gpu_self_test_table_keeps_every_network_name_whole() -> None:
    head = Measurement(
        "head peripheral-blood",
        "ort-tensorrt",
        "fp16",
        True,
        {"changed_calls": 0.0, "max_probability_diff": 3.1e-4, "min_attention_cosine": 0.9991},
        {"changed_calls": "== 0"},
        0.00042,
        "cell",
    )
    rows = (
        dataclasses.replace(head, network="encoder", metrics={"min_cosine": 0.9994}),
        head,
        dataclasses.replace(head, network="head myeloma-risk", passed=False),
        dataclasses.replace(head, backend="tensorrt", passed=None, detail="TensorRT is absent"),
    )
    lines = rendered(lambda console: console.print(self_test_table(SelfTestReport("a", rows))))
    assert fits(lines)
    for name in ("head peripheral-blood", "head myeloma-risk", "ort-tensorrt"):
        assert whole(name, lines), name


def test_the_score_table_shows_the_plasma_cell_burden_and_the_unsure_cells(
    tmp_path: Path,
) -> None:
    two = load_taxonomy("marrow-mll").restricted(("plasma_cell", "other_cell"))
    run = ScoreRun()
    for case_id, taxonomy, counts, unsure in (
        ("MM-2611-0416-second-opinion", load_taxonomy("marrow-mll"), MARROW_COUNTS, 41),
        ("MM-2611-0420", two, (97, 318), 23),
    ):
        folder = write_differential_case(tmp_path, case_id, taxonomy, counts, unsure)
        run.cases.append(ScoredCase(read_result(folder.path), folder, ()))
    lines = rendered(lambda console: print_table(run, console))
    assert fits(lines[: -len(run.cases)])
    rows = [line for line in lines if "Plasma cells" in line]
    assert len(rows) == 2
    # Each case's share with its interval on its row, whole; below the minimum, the rule's words.
    assert "6.6 % (4.4-9.7)" in rows[0] and "23.4 % (19.6-27.7)" in rows[1]
    first = " ".join(" ".join(lines[lines.index(rows[0]) :]).split())
    assert "below 10 %, outside the burden the model was validated on" in first
    second = " ".join(" ".join(lines[lines.index(rows[1]) :]).split())
    assert "outside the burden" not in second
    unsure = [line for line in lines if "Unsure cells" in line]
    assert ["41 of 389" in unsure[0], "23 of 438" in unsure[1]] == [True, True]
