"""What ``cytoedge train`` and ``cytoedge validate`` print: the report's figures in short."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from appliance.validation.measures import Proportion, ValidationReport


def _p(p: Proportion) -> str:
    return "-" if p.value is None else f"{p.value:.2f}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(report: ValidationReport, console: Console) -> None:
    """A table per head, a row per task (the counts behind each proportion are in the
    report), a line per multi-class head and value, then the cases without a call."""
    for head in dict.fromkeys(t.head for t in report.tasks):
        console.print()
        console.print(_tasks_table(report, head))
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
