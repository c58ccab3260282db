"""Progress and stage timings of a slide or a case, as the CLI bars and the service see them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

ProgressCallback = Callable[[str, float], None]  # (stage, fraction 0..1 of that stage)
T = TypeVar("T")


def no_progress(stage: str, fraction: float) -> None:
    """The default progress callback: ignore."""


class StageTimer:
    """Seconds spent per stage, summed over tiles; reports progress as it goes."""

    def __init__(self, progress: ProgressCallback = no_progress) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def timed(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """Yield from ``items``, counting the time spent producing each as ``stage``."""
        iterator = iter(items)
        while True:
            with self.stage(stage):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
