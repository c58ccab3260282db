"""What ``cytoedge train`` and ``cytoedge validate`` print: the report's figures in short."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table

from appliance.validation.measures import CellReport, Proportion, ValidationReport


def _p(p: Proportion) -> str:
    return "-" if p.value is None else f"{p.value:.2f}"


def _figure(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def print_summary(report: ValidationReport, console: Console) -> None:
    """A table per head, a row per task (the counts behind each proportion are in the
    report), a line per multi-class head and value, then the cases without a call."""
    for head in dict.fromkeys(t.head for t in report.tasks):
        console.print()
        console.print(_tasks_table(report, head))
    if report.recipes:
        console.print()
        console.print(_recipes_table(report))
    for c in report.classes:
        console.print(
            f"{c.head}: {c.scored} of {c.labelled} cases, top-1 {_figure(c.top1)}, "
            f"top-2 {_figure(c.top2)}, macro recall {_figure(c.macro_recall)}, "
            f"ECE {_figure(c.ece)}"
        )
    for v in report.values:
        error = "-" if v.mean_absolute_error is None else f"{v.mean_absolute_error:.2f}"
        console.print(f"{v.head}: {v.label}: mean absolute error {error} on {v.scored} cases")
    for line in report.not_scored:
        console.print(f"[yellow]no call[/yellow] {line.case_id}: {line.status}: {line.reason}")
    for line in report.lost_scans:
        console.print(
            f"[yellow]scored without[/yellow] {line.case_id}: {'; '.join(line.rejected_scans)}"
        )
    if report.cells is not None:
        _print_cells(report, report.cells, console)


def _print_cells(report: ValidationReport, cells: CellReport, console: Console) -> None:
    """The cell head's headline figures, a line each, and its critical errors by pair in
    a table whose class names never wrap."""
    figures = cells.figures
    point = figures.operating_point
    reached = "reached" if point.reached else "not reached"
    console.print()
    console.print(
        f"{report.bundle_name} {report.bundle_version}, cell head {cells.head}: {report.kind}"
    )
    console.print(
        f"{figures.cells} labelled cells: macro F1 {_figure(figures.macro_f1)}, "
        f"weighted F1 {_figure(figures.weighted_f1)}"
    )
    console.print(
        f"operating point {_figure(point.confidence)}: coverage {_figure(point.coverage)}, "
        f"accuracy {_figure(point.accuracy)} (target {_figure(figures.target_accuracy)} "
        f"{reached})"
    )
    console.print(
        f"critical errors: {figures.critical_errors}, "
        f"{figures.critical_errors_sure} of them at or above the operating point"
    )
    if figures.critical_pairs:
        labels = {c.name: c.label for c in figures.classes}
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
        table.add_column("true class", no_wrap=True)
        table.add_column("called", no_wrap=True)
        table.add_column("cells", justify="right")
        table.add_column("sure", justify="right")
        for pair in figures.critical_pairs:
            table.add_row(labels[pair.true], labels[pair.called], str(pair.cells), str(pair.sure))
        console.print(table)


def _tasks_table(report: ValidationReport, head: str) -> Table:
    """One space between columns, so that 80 columns hold a task name of about 20
    characters; the name never wraps, the figures fold and the headers wrap first."""
    table = Table(
        title=f"{report.bundle_name} {report.bundle_version}, {head}: {report.kind}",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
    )
    table.add_column("task", no_wrap=True)
    for column in ("cases", "AUC", "95 % CI", "sens", "spec", "PPV", "NPV", "indet.", "no call"):
        table.add_column(column, justify="right", overflow="fold")
    for t in (t for t in report.tasks if t.head == head):
        interval = "-"
        if t.auc_low is not None and t.auc_high is not None:
            interval = f"{t.auc_low:.2f}-{t.auc_high:.2f}"
        table.add_row(
            t.label,
            f"{t.labelled} ({t.positives}+)",
            _figure(t.auc),
            interval,
            _p(t.sensitivity),
            _p(t.specificity),
            _p(t.ppv),
            _p(t.npv),
            str(t.indeterminate),
            str(t.not_scored),
        )
    return table


def _recipes_table(report: ValidationReport) -> Table:
    """Each marker's out-of-fold AUC by recipe, on the same folds; the written one first."""
    heads = list(report.recipes)
    table = Table(
        title="AUC by recipe, on the same folds", box=box.SIMPLE_HEAD, show_edge=False, padding=0
    )
    table.add_column("task", no_wrap=True)
    for index, head in enumerate(heads):
        written = "*" if index == 0 else ""
        table.add_column(f"{report.recipes[head]}{written}", justify="right")
    auc = {(t.head, t.task): t.auc for t in report.tasks}
    for task in (t for t in report.tasks if t.head == heads[0]):
        table.add_row(task.label, *(_figure(auc.get((head, task.task))) for head in heads))
    table.caption = "* written to the new version"
    return table
