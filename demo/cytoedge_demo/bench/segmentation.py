"""``cytoedge bench segmentation``: F1 at IoU 0.5 on held-out synthetic tiles, and speed.

The appliance's path (runtime + stardist NMS, no TensorFlow) is scored against
the generator's nucleated-cell instance masks. With the StarDist model folder
as well, TensorFlow's own ``predict_instances`` runs on the same normalised
tiles as the baseline: seconds per tile, the ratio, and whether the label
images are identical.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from appliance.segmentation import MatchCounts, Segmenter, match_instances, network_input
from cytoedge_demo.synthetic import segmentation_tiles
from runtime.backends import RuntimeSettings

# Training tiles use generator seeds seed * 1000 + i for small recipe seeds; these never meet.
HELD_OUT_SEED = 777


def evaluate(
    segmenter: Segmenter, n_tiles: int = 8, size: int = 512, seed: int = HELD_OUT_SEED
) -> MatchCounts:
    """Matches at IoU 0.5 summed over ``n_tiles`` held-out synthetic tiles."""
    images, masks = segmentation_tiles(n_tiles, size, seed)
    total = MatchCounts(0, 0, 0)
    for image, truth in zip(images, masks, strict=True):
        labels, _ = segmenter.segment(image)
        total = total + match_instances(truth, labels, 0.5)
    return total


def segmenter_section(folder: Path) -> dict[str, Any]:
    """The segmenter section of an export folder (``segmenter.json``) or a bundle."""
    for name in ("segmenter.json", "bundle.json"):  # both keep it under "segmenter"
        path = folder / name
        if path.is_file():
            section = json.loads(path.read_text(encoding="utf-8")).get("segmenter")
            if section:
                return dict(section)
    raise SystemExit(
        f"{folder}: neither a `cytoedge export segmenter` folder (segmenter.json) "
        "nor a bundle with a segmenter (bundle.json)"
    )


def run_segmentation_bench(
    segmenter_dir: Path,
    stardist_dir: Path | None,
    n_tiles: int,
    size: int,
    seed: int,
    backend: str,
    threads: int,
) -> MatchCounts:
    """Print the figures; return the ONNX path's counts."""
    console = Console()
    segmenter = Segmenter.open(
        segmenter_dir, segmenter_section(segmenter_dir), RuntimeSettings(backend, threads)
    )
    images, masks = segmentation_tiles(n_tiles, size, seed)
    segmenter.segment(images[0])  # warm-up: session start, first-call allocations
    counts, labels, seconds = MatchCounts(0, 0, 0), [], 0.0
    for image, truth in zip(images, masks, strict=True):
        start = time.perf_counter()
        label, _ = segmenter.segment(image)
        seconds += time.perf_counter() - start
        labels.append(label)
        counts = counts + match_instances(truth, label, 0.5)
    table = Table(title=f"Segmentation on {n_tiles} held-out synthetic tiles of {size} px")
    for column in ("path", "TP", "FP", "FN", "precision", "recall", "F1 @ IoU 0.5", "s / tile"):
        table.add_column(column)
    backend_name = getattr(segmenter.network, "name", backend)
    table.add_row(
        f"runtime ({backend_name}) + stardist NMS",
        *_figures(counts),
        f"{seconds / n_tiles:.3f}",
    )
    if stardist_dir is not None:
        from export.segmenter import load_stardist

        model = load_stardist(stardist_dir, threads)
        inputs = [network_input(image, segmenter.spec) for image in images]
        model.predict_instances(inputs[0], verbose=False)
        tf_counts, tf_seconds, identical = MatchCounts(0, 0, 0), 0.0, True
        for x, truth, ours in zip(inputs, masks, labels, strict=True):
            start = time.perf_counter()
            expected, _ = model.predict_instances(x, verbose=False)
            tf_seconds += time.perf_counter() - start
            tf_counts = tf_counts + match_instances(truth, expected, 0.5)
            identical &= bool(np.array_equal(expected, ours))
        table.add_row(
            "TensorFlow predict_instances", *_figures(tf_counts), f"{tf_seconds / n_tiles:.3f}"
        )
        console.print(table)
        console.print(
            f"TensorFlow / runtime time ratio: {tf_seconds / max(seconds, 1e-9):.2f}x; "
            f"label images identical on every tile: {identical}"
        )
    else:
        console.print(table)
    return counts


def _figures(counts: MatchCounts) -> list[str]:
    return [
        str(counts.true_positives),
        str(counts.false_positives),
        str(counts.false_negatives),
        f"{counts.precision:.3f}",
        f"{counts.recall:.3f}",
        f"{counts.f1:.3f}",
    ]
