"""``cytoedge bench soak N``: N small scans in bursts through a real ``cytoedge run``.

Prints throughput (scans per minute, from the first drop to the last scan
finished, quiet periods included), seconds per scan, how each scan ended, and
the service process's resident memory: idle after start, warm after the first
burst, at the end and at peak. The target is growth < 10 % from warm to end
over 200 scans. Scans are copies of a few synthetic templates, each made
unique by trailing bytes after the image data (readers ignore them; the
fingerprint changes), so every one is processed from scratch, never from a
cache.

The soak measures the service (memory, failures, throughput), not the model:
smears are small (``--size``, 512 px by default) with few cells (``--cells``,
about 20), so that 200 scans take minutes, not an hour, on a 2-core CPU where
the encoder's time, which grows with the cells, dominates. Every scan still goes
through segmentation, the encoder, the heads and the result with its report;
for the heads to run on so few cells, the service gets a copy of the bundle
(its files linked, not copied) whose ``cells.min_cells`` is 1, so every scan
with a cell is scored. The printed table says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance.service.store import TERMINAL, JobStore, StoreError

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("smear", "cells")
TEMPLATES = 8
GROWTH_TARGET = 0.10
DEFAULT_SIZE_PX = 512
DEFAULT_CELLS = 20
MIN_SIZE_PX = 256
PIXEL_SIZE_UM = 0.25
# The soak bundle's minimum cells per case: the heads run on every scan with a cell.
SOAK_MIN_CELLS = 1


@dataclass
class SoakReport:
    scans: int
    kind: str = "smear"
    size_px: int = DEFAULT_SIZE_PX
    min_cells: int = 0  # the soak bundle's minimum, for the heads to run
    cells: int = 0  # over all scans, as the service counted them
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    rss_idle_mb: float = 0.0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    stop_seconds: float = 0.0
    exit_code: int | None = None

    @property
    def per_minute(self) -> float:
        return self.scans / self.seconds * 60 if self.seconds else 0.0

    @property
    def seconds_per_scan(self) -> float:
        return self.seconds / self.scans if self.scans else 0.0

    @property
    def growth(self) -> float:
        return self.rss_end_mb / self.rss_warm_mb - 1 if self.rss_warm_mb else 0.0

    @property
    def failures(self) -> int:
        """Scans that ended in an error (rejected is an answer about the input, not one)."""
        return self.outcomes.get("failed", 0)


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def smear_density(cells: int, size_px: int) -> float:
    """Nucleated cells per mm2 that put about ``cells`` cells on a square smear."""
    side_mm = size_px * PIXEL_SIZE_UM / 1000
    return cells / side_mm**2


def make_templates(
    kind: str,
    folder: Path,
    count: int,
    *,
    size_px: int = DEFAULT_SIZE_PX,
    cells: int = DEFAULT_CELLS,
) -> list[Path]:
    """A few distinct small scans to copy from."""
    from cytoedge_demo import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "cells":
        synthetic.write_cell_folders(folder, count, cells, seed=5)
        return sorted(p for p in folder.iterdir() if p.is_dir())
    paths = []
    for seed in range(count):
        path = folder / f"template-{seed}.tif"
        spec = synthetic.SmearSpec(
            width=size_px,
            height=size_px,
            seed=seed,
            nucleated_per_mm2=smear_density(cells, size_px),
            plasma_fraction=0.6,
        )
        synthetic.write_smear(path, spec)
        paths.append(path)
    return paths


def soak_bundle(source: Path, target: Path, min_cells: int) -> int:
    """A bundle at ``target`` that is ``source`` with ``cells.min_cells`` at most
    ``min_cells``; its files are symbolic links to the source's. Returns the minimum."""
    from runtime.bundle_format import CellsSpec

    manifest = json.loads((source / "bundle.json").read_text(encoding="utf-8"))
    cells = manifest.setdefault("cells", {})
    lowered = min(int(cells.get("min_cells", CellsSpec.min_cells)), min_cells)
    cells["min_cells"] = lowered
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "bundle.json" and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry.resolve())
    (target / "bundle.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return lowered


def drop_unique(template: Path, inbox: Path, index: int) -> None:
    """Copy a template into the inbox under a temporary name, made unique, then rename."""
    name = f"soak-{index:05d}" + ("" if template.is_dir() else template.suffix)
    temp = inbox / f"{name}.part"
    if template.is_dir():
        shutil.copytree(template, temp)
        target_file = min(p for p in temp.iterdir() if p.suffix == ".tif")
    else:
        shutil.copyfile(template, temp)
        target_file = temp
    with open(target_file, "ab") as handle:
        handle.write(f"cytoedge-soak-{index:08d}".encode())
    os.rename(temp, inbox / name)


def write_config(work: Path, bundle: Path, quiet: float) -> Path:
    lines = [
        "[paths]",
        f'data_dir = "{work / "data"}"',
        f'inbox = "{work / "inbox"}"',
        f'outbox = "{work / "outbox"}"',
        f'bundle = "{bundle}"',
        "[watch]",
        f"quiet_seconds = {quiet}",
        f"case_quiet_seconds = {quiet}",
        "rescan_seconds = 10.0",
        "[logging]",
        'level = "WARNING"',
    ]
    for name in ("data", "inbox", "outbox"):
        (work / name).mkdir(parents=True, exist_ok=True)
    path = work / "cytoedge.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _finished(store_path: Path) -> tuple[int, dict[str, int], int, int]:
    """(cases finished, outcomes by state, copies recognised, cells) from the store."""
    try:
        store = JobStore(store_path, readonly=True, timeout=2.0)
    except StoreError:
        return 0, {}, 0, 0
    try:
        cases = store.cases()
        slides = store.slides()
    finally:
        store.close()
    copies = sum(1 for s in slides if s.duplicate_of is not None)
    cells = sum(s.n_cells or 0 for s in slides)
    outcomes: dict[str, int] = {}
    for case in cases:
        if case.state in TERMINAL:
            outcomes[case.state] = outcomes.get(case.state, 0) + 1
    return sum(outcomes.values()), outcomes, copies, cells


def run_soak(
    scans: int,
    *,
    bundle: Path,
    kind: str = "smear",
    size_px: int = DEFAULT_SIZE_PX,
    cells: int = DEFAULT_CELLS,
    burst: int = 10,
    quiet: float = 2.0,
    work: Path | None = None,
    timeout_per_scan: float = 120.0,
    console: Console | None = None,
) -> SoakReport:
    console = console or Console(stderr=True)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if size_px < MIN_SIZE_PX:
        raise ValueError(f"size must be at least {MIN_SIZE_PX} px")
    if cells < 2:
        raise ValueError("cells must be at least 2")
    work = work or Path(tempfile.mkdtemp(prefix="cytoedge-soak-"))
    templates = make_templates(
        kind, work / "templates", min(scans, TEMPLATES), size_px=size_px, cells=cells
    )
    min_cells = soak_bundle(bundle, work / "bundle", SOAK_MIN_CELLS)
    config = write_config(work, work / "bundle", quiet)
    store_path = work / "data" / "state" / "jobs.sqlite"
    report = SoakReport(scans, kind=kind, size_px=size_px, min_cells=min_cells)
    env = {**os.environ, "CYTOEDGE_CONFIG": str(config), "QT_QPA_PLATFORM": "offscreen"}
    log = open(work / "service.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 120
        while not store_path.exists() and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited ({proc.returncode}); see {log.name}")
            time.sleep(0.2)
        time.sleep(2.0)
        report.rss_idle_mb = rss_mb(proc.pid)
        inbox = work / "inbox"
        dropped = 0
        started = time.monotonic()
        limit = started + timeout_per_scan * scans
        with Progress(
            TextColumn("soak"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task("scans", total=scans)
            finished = 0
            while finished < scans:
                if proc.poll() is not None:
                    raise RuntimeError(f"the service exited ({proc.returncode}); see {log.name}")
                if time.monotonic() > limit:
                    raise TimeoutError(f"only {finished} of {scans} scans finished in time")
                if dropped < scans and dropped - finished < burst:
                    for _ in range(min(burst, scans - dropped)):
                        drop_unique(templates[dropped % len(templates)], inbox, dropped)
                        dropped += 1
                time.sleep(0.5)
                finished, report.outcomes, report.duplicates, report.cells = _finished(store_path)
                report.rss_peak_mb = max(report.rss_peak_mb, rss_mb(proc.pid))
                if not report.rss_warm_mb and finished >= min(burst, scans):
                    report.rss_warm_mb = rss_mb(proc.pid)
                progress.update(task, completed=finished)
        report.seconds = time.monotonic() - started
        report.rss_end_mb = rss_mb(proc.pid)
        stop_started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        report.exit_code = proc.wait(120)
        report.stop_seconds = time.monotonic() - stop_started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    return report


def print_report(report: SoakReport, console: Console) -> None:
    what = f"{report.size_px} px smears" if report.kind == "smear" else "single-cell folders"
    table = Table(title=f"soak: {report.scans} {what} through `cytoedge run`")
    table.add_column("measure")
    table.add_column("value", justify="right")
    outcomes = ", ".join(f"{n} {state}" for state, n in sorted(report.outcomes.items()))
    rows = [
        ("wall time", f"{report.seconds:.1f} s"),
        ("throughput", f"{report.per_minute:.1f} scans/min"),
        ("per scan", f"{report.seconds_per_scan:.1f} s"),
        ("cells per scan (mean)", f"{report.cells / report.scans:.1f}"),
        ("bundle min_cells (soak copy)", str(report.min_cells)),
        ("outcomes", outcomes or "-"),
        ("failures (state failed)", str(report.failures)),
        ("copies recognised (expected 0)", str(report.duplicates)),
        ("RSS idle after start", f"{report.rss_idle_mb:.0f} MB"),
        ("RSS warm (after first burst)", f"{report.rss_warm_mb:.0f} MB"),
        ("RSS at end", f"{report.rss_end_mb:.0f} MB"),
        ("RSS peak", f"{report.rss_peak_mb:.0f} MB"),
        ("RSS growth warm -> end", f"{report.growth:+.1%} (target < {GROWTH_TARGET:.0%})"),
        ("SIGTERM to exit", f"{report.stop_seconds:.1f} s (exit {report.exit_code})"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
