"""``cytoedge bench crop-input``: a bundle's encoder fed as the runtime feeds it today
(each 128 px crop resized to 224 on the CPU, normalised, float32 to the network) against
the same file with that preprocessing folded into its graph (uint8 crops in).

Both run in one process on the same rendered crops, alternately, through
``runtime.encoder.Encoder`` (the scoring path), so a busy CPU slows both alike; the
median of the repeats counts. The bytes each batch sends to the network are printed too:
on a GPU they cross the bus.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from appliance.pipeline.cells import resize_bilinear
from cytoedge_demo.bench.gemm import cpu_description
from export.crop_input import fold_in_place, render_crops
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle, load_bundle, write_bundle
from runtime.encoder import Encoder
from runtime.parity import row_cosines


def run_crop_input_bench(
    bundle_dir: Path, cells: int, repeats: int, threads: int, crop_px: int
) -> None:
    console = Console()
    bundle = load_bundle(bundle_dir)
    if bundle.encoder.input.crop_px:
        raise SystemExit(f"{bundle_dir}: its encoder already takes uint8 crops")
    settings = RuntimeSettings("ort-cpu", threads=threads)
    plain = Encoder(bundle, settings)
    variant = plain.variant
    crops = render_crops(cells, crop_px, seed=77)
    with tempfile.TemporaryDirectory(prefix="crop-input-") as work:
        folded_bundle = _folded_copy(bundle, variant, crop_px, Path(work))
        folded = Encoder(folded_bundle, settings)
        size = bundle.encoder.input.size

        def as_before() -> np.ndarray:
            return plain.embed(np.stack([resize_bilinear(c, size) for c in crops]))

        def in_graph() -> np.ndarray:
            return folded.embed(crops)

        runs: dict[str, list[float]] = {"as before": [], "folded": []}
        outputs = {"as before": as_before(), "folded": in_graph()}  # warm-up
        for _ in range(repeats):
            for name, run in (("as before", as_before), ("folded", in_graph)):
                started = time.perf_counter()
                run()
                runs[name].append(time.perf_counter() - started)
        plain.close()
        folded.close()
    cosine = float(row_cosines(outputs["as before"], outputs["folded"]).min())
    table = Table(title=f"{bundle.name} {bundle.version}: {variant} encoder, {cells} crops")
    for column in ("feed", "s (median)", "cells/s", "ratio", "bytes per cell"):
        table.add_column(column)
    baseline = statistics.median(runs["as before"])
    per_cell = {"as before": 4 * 3 * size * size, "folded": 3 * crop_px * crop_px}
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        table.add_row(
            f"{name} ({'uint8 crops' if name == 'folded' else 'float32 pixels'})",
            f"{median:.2f}",
            f"{cells / median:.1f}",
            f"{baseline / median:.2f}x",
            f"{per_cell[name]:,}",
        )
    console.print(table)
    console.print(f"min cosine, folded vs as before: {cosine:.6f}")
    console.print(cpu_description())


def _folded_copy(bundle: Bundle, variant: str, crop_px: int, work: Path) -> Bundle:
    """A bundle whose encoder (the variant this CPU loads) has its preprocessing folded in."""
    spec = bundle.encoder
    name = spec.variants[variant]
    target = work / name
    shutil.copy(bundle.file(name), target)
    fold_in_place(target, variant, crop_px, spec.input.size, spec.input.mean, spec.input.std)
    encoder = dataclasses.replace(
        spec,
        variants={variant: name} if variant == "fp32" else {"fp32": name, variant: name},
        input=dataclasses.replace(spec.input, crop_px=crop_px),
    )
    return write_bundle(
        work / "bundle",
        name=bundle.name,
        version=bundle.version,
        intended_use=bundle.intended_use,
        sources={name: target},
        encoder=encoder,
        heads=[],
    )
