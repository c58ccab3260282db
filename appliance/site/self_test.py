"""``cytoedge doctor --self-test``, and the service before its first job with a bundle
(``appliance.service.follow``): every path of the encoder and the segmenter measured
here, gated, timed, and the fastest that passed kept as this machine's choice
(``appliance.site.measured_choice``); doctor's table says what each did."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance.site.backend_check import (
    REFERENCE,
    TILE_PX,
    ProgressFn,
    SelfTestReport,
    run_self_test,
)
from appliance.site.measured_choice import NETWORKS, Choice, choose, write_choice
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle
from runtime.probe import cpu_info


def measure_paths(
    bundle: Bundle, settings: RuntimeSettings, state_dir: Path, out: Console
) -> tuple[SelfTestReport, list[Choice], Path]:
    """``measure`` with a progress bar on ``out``."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=out
    ) as bars:
        task = bars.add_task("self-test", total=1.0)
        return measure(
            bundle,
            settings,
            state_dir,
            lambda stage, done: bars.update(task, description=stage, completed=done),
        )


def measure(
    bundle: Bundle,
    settings: RuntimeSettings,
    state_dir: Path,
    progress: ProgressFn | None = None,
    report: SelfTestReport | None = None,
) -> tuple[SelfTestReport, list[Choice], Path]:
    """Measure, choose and keep; the report, the choices and where they are kept.
    ``report``: a self-test that already timed every path of both networks (the GPU
    self-test's), chosen from instead of measuring again."""
    if report is None:
        report = run_self_test(bundle, settings, networks=NETWORKS, progress=progress)
    choices = choose(bundle, report.measurements)
    return report, choices, write_choice(state_dir, bundle, choices, report.measurements)


def choice_table(report: SelfTestReport, choices: list[Choice]) -> Table:
    """One row per path: its speed, its gate figure against the limit, and the choice."""
    cpu = cpu_info()
    table = Table(
        title=f"Paths measured on {cpu.model or 'this CPU'}, against {REFERENCE} (fp32)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    for column in ("network", "path", "speed", "gate", "chosen"):
        table.add_column(column, no_wrap=column != "gate")
    chosen = {(c.network, c.backend, c.precision) for c in choices}
    for row in report.measurements:
        path = f"{row.backend} {row.variant}"
        if row.passed is None:
            table.add_row(row.network, path, "-", f"not loaded: {row.detail}", "")
            continue
        if row.unit == "cell":
            speed = f"{1 / row.seconds_per_unit:.1f} cells/s"
        else:  # per megapixel: back to the time of the one field it ran on
            speed = f"{row.seconds_per_unit * TILE_PX**2 / 1e6:.3f} s/tile ({TILE_PX} px)"
        key = next(iter(row.limits), "")
        figure = f"{key} {row.metrics.get(key, 0.0):.6g} ({row.limits.get(key, '')})"
        verdict = "pass" if row.passed else "[bold red]FAIL[/]"
        picked = (row.network, row.backend, row.variant) in chosen
        mark = "[bold green]<- chosen[/]" if picked else ""
        table.add_row(row.network, path, speed, f"{verdict}: {figure}", mark)
    return table
