"""``cytoedge bench pipeline``: one synthetic slide end to end, then one of twice the area.

Each slide is scored in a fresh child process so that its peak RSS (the
process's high-water mark, ``ru_maxrss``) is its own; the per-slide cache is
a fresh folder so nothing is reused. Prints seconds per stage, the total,
cells kept, peak RSS, and the 2x-area time ratio (target <= 2.1: the pipeline
streams tiles, so time grows with area and memory does not).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH_SEED = 4242


def bench_slide(folder: Path, width: int, height: int) -> Path:
    """The bench slide (generated once per size): ~480 nucleated cells per mm²."""
    from cytoedge_demo.synthetic import SmearSpec, write_smear

    path = folder / f"bench-{width}x{height}.tif"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_smear(path, SmearSpec(width=width, height=height, seed=BENCH_SEED))
    return path


def score_one(slide: Path, bundle_dir: Path, backend: str, threads: int) -> dict[str, Any]:
    """Process + score one slide in this process; what the parent prints."""
    from appliance.cases import score_case
    from appliance.networks import SlideNetworks
    from appliance.slides import process_slide
    from runtime.backends import RuntimeSettings
    from runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    settings = RuntimeSettings(backend=backend, threads=threads)
    with (
        tempfile.TemporaryDirectory(prefix="cytoedge-bench-") as work,
        SlideNetworks(bundle, settings) as networks,
    ):
        start = time.perf_counter()
        result = process_slide(slide, networks, cache_dir=Path(work) / "cache")
        case = score_case("bench", [result], bundle, Path(work) / "out", settings=settings)
        total = time.perf_counter() - start
    return {
        "slide": slide.name,
        "stages": case.result.timings_s,
        "total_s": round(total, 2),
        "cells": result.n_cells,
        "status": case.result.status,
        "backend": case.result.backend,
        "encoder": result.scan.encoder_variant or "-",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _child(slide: Path, bundle_dir: Path, backend: str, threads: int) -> dict[str, Any]:
    code = (
        "import json, sys; from pathlib import Path; "
        "from cytoedge_demo.bench.pipeline import score_one; "
        "print('RESULT ' + json.dumps(score_one(Path(sys.argv[1]), Path(sys.argv[2]), "
        "sys.argv[3], int(sys.argv[4]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(slide), str(bundle_dir), backend, str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"bench child failed on {slide.name}: {done.stderr.strip()[-800:]}")


def run_pipeline_bench(
    bundle_dir: Path,
    slides_dir: Path,
    size: int = 8192,
    large: int = 0,
    backend: str = "auto",
    threads: int = 0,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Score the size x size slide, the 2x-area slide and (``large`` > 0) a large x large one."""
    console = console or Console()
    plan = [(size, size), (2 * size, size)]
    if large:
        plan.append((large, large))
    rows = []
    for width, height in plan:
        console.print(f"generating / reusing the {width}x{height} bench slide ...")
        slide = bench_slide(slides_dir, width, height)
        console.print(f"scoring {slide.name} in a fresh process ...")
        rows.append(_child(slide, bundle_dir, backend, threads))
    _print(rows, console)
    return rows


def _print(rows: list[dict[str, Any]], console: Console) -> None:
    """One column per slide, one row per stage (seconds summed over tiles), then totals."""
    order = ["fingerprint", "read", "stain", "qc", "segment", "cells", "embed"]
    stages = [s for s in order if any(s in r["stages"] for r in rows)]
    stages += sorted({k for r in rows for k in r["stages"]} - set(stages))
    table = Table(title="cytoedge bench pipeline")
    table.add_column("seconds")
    for row in rows:
        table.add_column(row["slide"].removeprefix("bench-").removesuffix(".tif"), justify="right")
    for stage in stages:
        table.add_row(stage, *(f"{r['stages'].get(stage, 0.0):.1f}" for r in rows))
    table.add_row("total", *(f"{r['total_s']:.1f}" for r in rows))
    table.add_row("cells kept", *(str(r["cells"]) for r in rows))
    table.add_row("peak RSS MB", *(f"{r['peak_rss_mb']:.0f}" for r in rows))
    table.add_row("backend", *(str(r["backend"]) for r in rows))
    table.add_row("encoder", *(str(r["encoder"]) for r in rows))
    console.print(table)
    if len(rows) >= 2 and rows[0]["total_s"] > 0:
        ratio = rows[1]["total_s"] / rows[0]["total_s"]
        console.print(f"2x-area time ratio: {ratio:.2f} (target <= 2.1)")
