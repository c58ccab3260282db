"""``cytoedge bench pipeline``: one synthetic slide end to end, then larger ones.

Each slide is scored in a fresh child process so that its peak RSS (the
process's high-water mark, ``ru_maxrss``) is its own; the per-slide cache is
a fresh folder so nothing is reused. Prints seconds per stage, the total,
cells kept, how much of the cellular zone was examined, peak RSS, and each
larger slide's time against the first. With the bundle's cell budget a slide
stops once it has its cells, so the target is a ratio near 1 (<= 1.3) at any
size; with ``--budget 0`` time grows with the zone's area. With ``--every-cell``
the first slide is scored once more with every case head reading every cell:
against a bundle whose myeloma head reads plasma cells, what the visit's longer
walk (its budget counted in plasma cells) costs. The networks open as the service
opens them, with the site's measured choice (``cytoedge doctor --self-test``) under
``backend = "auto"``; the table names the backend and precision each one ran on.
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


def parse_size(text: str) -> tuple[int, int]:
    """ "40000" (a square) or "100000x50000" (width x height), px at 0.25 um/px."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) < 16:
        raise ValueError(f"a slide size is N or WxH in pixels (at least 16), not {text!r}")
    return (sizes[0], sizes[-1])


def bench_slide(folder: Path, width: int, height: int) -> Path:
    """The bench slide (generated once per size, streamed): ~480 nucleated cells per
    mm². A slide at least twice as wide as high is smear-shaped: thick body at the
    left, monolayer, bare feathered edge at the right."""
    from cytoedge_demo.synthetic import SmearSpec, write_smear

    layout = "smear" if width >= 2 * height else "monolayer"
    path = folder / f"bench-{width}x{height}.tif"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        spec = SmearSpec(width=width, height=height, seed=BENCH_SEED, layout=layout)
        write_smear(path, spec)
    return path


def score_one(
    slide: Path,
    bundle_dir: Path,
    backend: str,
    threads: int,
    budget: int | None = None,
    every_cell: bool = False,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Process + score one slide in this process; what the parent prints.
    ``budget``: cells per slide instead of the bundle's (None: the bundle's);
    ``every_cell``: the case heads' bags of every class, whatever the bundle says;
    ``state_dir``: the site's, whose measured choice and refused backends apply."""
    import dataclasses

    from appliance.pipeline.cases import score_case
    from appliance.pipeline.networks import SlideNetworks
    from appliance.pipeline.slides import process_slide
    from appliance.site.backend_check import site_settings
    from runtime.backends import RuntimeSettings
    from runtime.bundle_format import load_bundle

    bundle = load_bundle(bundle_dir)
    if budget is not None:
        cells = dataclasses.replace(bundle.cells, max_cells_per_slide=budget)
        bundle = dataclasses.replace(bundle, cells=cells)
    if every_cell:
        heads = tuple(dataclasses.replace(h, bag_classes=()) for h in bundle.heads)
        bundle = dataclasses.replace(bundle, heads=heads)
    settings = RuntimeSettings(backend=backend, threads=threads)
    if state_dir is not None:
        settings = site_settings(settings, state_dir, bundle)
    with (
        tempfile.TemporaryDirectory(prefix="cytoedge-bench-") as work,
        SlideNetworks(bundle, settings) as networks,
    ):
        start = time.perf_counter()
        result = process_slide(slide, networks, cache_dir=Path(work) / "cache")
        case = score_case("bench", [result], bundle, Path(work) / "out", settings=settings)
        total = time.perf_counter() - start
        paths = {
            "encoder": (networks.backend_name, result.scan.encoder_variant),
            "segmenter": (networks.segmenter_backend, result.scan.segmenter_variant),
        }
    examined = result.scan.examined
    differential = case.result.differential
    return {
        "slide": slide.name + (" (every cell)" if every_cell else ""),
        "stages": case.result.timings_s,
        "total_s": round(total, 2),
        "cells": result.n_cells,
        "examined": f"{examined.tiles}/{examined.zone_tiles}" if examined else "-",
        "stopped": examined.stopped if examined else "-",
        "budget": bundle.cells.max_cells_per_slide,
        "counted": " or ".join(examined.budget_classes)
        if examined and examined.budget_classes
        else "cells",
        "plasma": next((c.count for c in differential.classes if c.name == "plasma_cell"), "-")
        if differential
        else "-",
        "status": case.result.status,
        **{name: f"{ran} {variant}" if ran else "-" for name, (ran, variant) in paths.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _child(
    slide: Path,
    bundle_dir: Path,
    backend: str,
    threads: int,
    budget: int | None,
    state_dir: Path,
    every_cell: bool = False,
) -> dict[str, Any]:
    code = (
        "import json, sys; from pathlib import Path; "
        "from cytoedge_demo.bench.pipeline import score_one; "
        "budget = None if sys.argv[5] == '-' else int(sys.argv[5]); "
        "print('RESULT ' + json.dumps(score_one(Path(sys.argv[1]), Path(sys.argv[2]), "
        "sys.argv[3], int(sys.argv[4]), budget, sys.argv[6] == 'every', Path(sys.argv[7]))))"
    )
    budget_arg = "-" if budget is None else str(budget)
    bag = "every" if every_cell else "bundle"
    arguments = [
        str(slide),
        str(bundle_dir),
        backend,
        str(threads),
        budget_arg,
        bag,
        str(state_dir),
    ]
    done = subprocess.run(
        [sys.executable, "-c", code, *arguments],
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
    state_dir: Path,
    size: int = 8192,
    large: tuple[tuple[int, int], ...] = (),
    backend: str = "auto",
    threads: int = 0,
    budget: int | None = None,
    console: Console | None = None,
    every_cell: bool = False,
) -> list[dict[str, Any]]:
    """Score the size x size slide, the 2x-area slide and each ``large`` (width, height)
    with the measured choice kept in ``state_dir``; with ``every_cell`` the first slide
    again with every case head reading every cell."""
    console = console or Console()
    plan = [(size, size), (2 * size, size), *large]
    rows = []
    for width, height in plan:
        console.print(f"generating / reusing the {width}x{height} bench slide ...")
        started = time.perf_counter()
        slide = bench_slide(slides_dir, width, height)
        made = time.perf_counter() - started
        if made > 1.0:
            console.print(f"  written in {made:.0f} s ({slide.stat().st_size / 1e6:.0f} MB)")
        console.print(f"scoring {slide.name} in a fresh process ...")
        rows.append(_child(slide, bundle_dir, backend, threads, budget, state_dir))
    if every_cell:
        first = bench_slide(slides_dir, size, size)
        console.print(f"scoring {first.name} with every cell in the bags ...")
        rows.insert(
            1, _child(first, bundle_dir, backend, threads, budget, state_dir, every_cell=True)
        )
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
        table.add_column(row["slide"].removeprefix("bench-").replace(".tif", ""), justify="right")
    for stage in stages:
        table.add_row(stage, *(f"{r['stages'].get(stage, 0.0):.1f}" for r in rows))
    # Tiles are read and judged on a thread of their own while the networks run:
    # the total is below the sum of the stages by what that overlap saves.
    table.add_row("sum of stages", *(f"{sum(r['stages'].values()):.1f}" for r in rows))
    table.add_row("total", *(f"{r['total_s']:.1f}" for r in rows))
    table.add_row("cells kept", *(str(r["cells"]) for r in rows))
    table.add_row("cell budget", *(str(r["budget"] or "none") for r in rows))
    table.add_row("budget counts", *(str(r["counted"]) for r in rows))
    table.add_row("plasma cells", *(str(r["plasma"]) for r in rows))
    table.add_row("tiles examined", *(str(r["examined"]) for r in rows))
    table.add_row("stopped", *(str(r["stopped"]) for r in rows))
    table.add_row("peak RSS MB", *(f"{r['peak_rss_mb']:.0f}" for r in rows))
    table.add_row("encoder ran on", *(str(r["encoder"]) for r in rows))
    table.add_row("segmenter ran on", *(str(r["segmenter"]) for r in rows))
    console.print(table)
    if rows[0]["total_s"] <= 0:
        return
    budgeted = all(r["budget"] for r in rows)
    target = "target <= 1.3 with a cell budget" if budgeted else "no budget: grows with area"
    for row in rows[1:]:
        if row["slide"].endswith("(every cell)"):
            ratio = rows[0]["total_s"] / row["total_s"]
            console.print(f"{rows[0]['slide']}, bag as the bundle says / every cell: {ratio:.2f}")
            continue
        ratio = row["total_s"] / rows[0]["total_s"]
        console.print(f"{row['slide']} / {rows[0]['slide']} time ratio: {ratio:.2f} ({target})")
