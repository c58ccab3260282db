"""``cytoedge bench fuzz``: the readers on mutated real files for minutes, each in a child.

Inputs come from ``fuzz_inputs`` (hypothesis generates them, seeded, in batches of
``BATCH`` until the time is up; nothing is shrunk). Each is read by a forked child
process, so that what the suite cannot see is measured here:

- a hang: the child has ``timeout`` seconds to answer, then it is killed;
- a crash of the process itself (a C library's abort): the child's signal;
- memory: the child's address space may grow by ``HEADROOM_MB`` only (a larger
  allocation is a MemoryError, a failure), and its peak resident memory while
  reading, above what it held before, is the input's growth; above ``memory_mb``
  it is a failure.

A failure is named by its exception type and the innermost line of the appliance it
passed, so one bug found a thousand times is one line of the report. ``--keep``
writes the first input of each distinct failure to a folder.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from rich.console import Console
from rich.table import Table

from cytoedge_demo.bench.fuzz_inputs import (
    FuzzInput,
    Outcome,
    fuzz_inputs,
    outcome,
    place,
    seed_files,
    where_raised,
)

BATCH = 200
HEADROOM_MB = 2048
_KB = 1024


@dataclass
class Failure:
    """One distinct failure: how often it came, and the first input that showed it."""

    count: int
    first: FuzzInput


@dataclass
class FuzzReport:
    """What a run tried and met; ``growth_mb`` holds each input's peak resident growth."""

    tried: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    failures: dict[str, Failure] = field(default_factory=dict)
    growth_mb: list[float] = field(default_factory=list)
    slowest_s: float = 0.0
    seconds: float = 0.0
    seeds: int = 0


def _status_kb(key: str) -> int:
    """A ``/proc/self/status`` figure in kB (VmRSS, VmHWM, VmSize)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(key + ":"))
    return int(line.split()[1])


def _in_child(path: Path, write_end: int) -> None:
    """The child's side: read under the address-space limit, answer, exit at once.

    The peak resident memory is reset first (``clear_refs`` 5), so that the answer's
    growth is this input's: the peak while reading less the resident size before.
    """
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # libtiff's and the readers' warnings on damaged files: not the report's
    try:
        limit = (_status_kb("VmSize") + HEADROOM_MB * _KB) * _KB
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _status_kb("VmRSS")
        result = outcome(path)
        answer = [result.kind, result.detail, result.reason]
    except BaseException as exc:  # MemoryError outside a reader, anything at all
        answer = ["failure", f"{type(exc).__name__} at {where_raised(exc)}", ""]
        before = _status_kb("VmRSS")
    answer.append((_status_kb("VmHWM") - before) / _KB)
    os.write(write_end, json.dumps(answer).encode())
    os._exit(0)


def run_one(path: Path, timeout: float) -> tuple[Outcome, float, float]:
    """(outcome, seconds, peak resident growth in MB) of reading ``path`` in a child;
    a child killed (a hang, an abort) has no growth to report: 0."""
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _in_child(path, write_end)
    os.close(write_end)
    chunks = []
    deadline = started + timeout
    with os.fdopen(read_end, "rb") as answer:
        while (left := deadline - time.perf_counter()) > 0:
            if not select.select([answer], [], [], left)[0]:
                continue
            chunk = os.read(answer.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    if os.WIFSIGNALED(status) and seconds >= timeout:
        return Outcome("failure", f"hang: no answer in {timeout:.0f} s"), seconds, 0.0
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return Outcome("failure", f"process killed by {name}"), seconds, 0.0
    kind, detail, reason, growth = json.loads(b"".join(chunks))
    return Outcome(kind, detail, reason), seconds, growth


def run_fuzz(
    data: Path,
    slides: Path | None,
    minutes: float,
    first_seed: int,
    timeout: float,
    memory_mb: float,
    keep: Path | None,
    console: Console,
) -> FuzzReport:
    """Fuzz until ``minutes`` have passed (whole batches); returns what happened."""
    seeds = seed_files(data, slides)
    if not seeds:
        raise FileNotFoundError(f"no seed files: no photos under {data}")
    report = FuzzReport(seeds=len(seeds))
    started = time.perf_counter()

    def check(item: FuzzInput, work: Path) -> None:
        with tempfile.TemporaryDirectory(dir=work) as folder:
            result, seconds, growth = run_one(place(item, Path(folder)), timeout)
        if result.kind != "failure" and growth > memory_mb:
            result = Outcome("failure", f"memory: resident memory grew by over {memory_mb:.0f} MB")
        report.tried += 1
        report.kinds[result.kind] += 1
        report.growth_mb.append(growth)
        report.slowest_s = max(report.slowest_s, seconds)
        if result.kind != "failure":
            return
        if result.detail in report.failures:
            report.failures[result.detail].count += 1
            return
        report.failures[result.detail] = Failure(1, item)
        console.print(f"[red]new failure[/] {result.detail}: {item.seed} {list(item.mutations)}")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            name = f"failure-{len(report.failures):02d}-{item.target}{item.suffix}"
            (keep / name).write_bytes(item.data)

    with tempfile.TemporaryDirectory(prefix="cytoedge-fuzz-") as work:
        batch = 0
        while time.perf_counter() - started < minutes * 60:

            @settings(
                max_examples=BATCH,
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @seed(first_seed + batch)
            @given(fuzz_inputs(seeds))
            def one_batch(item: FuzzInput) -> None:
                check(item, Path(work))

            one_batch()
            batch += 1
            console.print(f"{report.tried} inputs, {len(report.failures)} distinct failures")
    report.seconds = time.perf_counter() - started
    return report


def print_report(report: FuzzReport, console: Console) -> None:
    table = Table(title=f"Readers under a fuzzer: {report.tried} inputs from {report.seeds} seeds")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("time", f"{report.seconds:.0f} s")
    table.add_row("inputs per second", f"{report.tried / max(report.seconds, 1e-9):.1f}")
    for kind in ("read", "rejected", "failure"):
        table.add_row(f"inputs {kind}", str(report.kinds[kind]))
    table.add_row("distinct failures", str(len(report.failures)))
    table.add_row("slowest input", f"{report.slowest_s:.2f} s")
    if report.growth_mb:
        table.add_row("resident growth, median", f"{statistics.median(report.growth_mb):.0f} MB")
        table.add_row("resident growth, max", f"{max(report.growth_mb):.0f} MB")
    console.print(table)
    for detail, failure in report.failures.items():
        first = failure.first
        console.print(
            f"{failure.count:5d} x {detail} (first: {first.seed} as {first.target}, "
            f"{', '.join(first.mutations)})"
        )
