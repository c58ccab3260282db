"""What the one-off commands (``score``, ``train``, ``validate``, ``demo``) show on the
console while they work: one progress bar per pipeline stage. Also the reason such a
run gives for a scan this machine could not hold in memory (the service retries one
instead)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

OUT_OF_MEMORY = "not enough memory on this machine to process this scan"


class StageBars:
    """One rich progress bar per pipeline stage, created when the stage first reports."""

    def __init__(self, progress: Progress, prefix: str) -> None:
        self.progress = progress
        self.prefix = prefix
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"{self.prefix}{stage}", total=1.0)
        self.progress.update(self.tasks[stage], completed=max(0.0, min(1.0, fraction)))


def counted(count: int, noun: str) -> str:
    """ "1 cell", "3 cells": a count with its noun, as the console says it."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def new_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
