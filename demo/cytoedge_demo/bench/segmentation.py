"""``cytoedge bench segmentation``: F1 at IoU 0.5 on held-out synthetic tiles, and speed.

The appliance's path (runtime + stardist NMS, no TensorFlow) is scored against
the generator's nucleated-cell instance masks. With the StarDist model folder
as well, TensorFlow's own ``predict_instances`` runs on the same normalised
tiles as the baseline: seconds per tile, the ratio, and whether the label
images are identical.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from appliance.pipeline.segmentation import (
    Detections,
    MatchCounts,
    Segmenter,
    match_detections,
    match_instances,
    network_input,
)
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
    if variant := getattr(segmenter.network, "variant", ""):
        backend_name += f" {variant}"
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


# --- ways to make segmentation cheaper, measured against fp32 in one run ------------------

SPEED_PX = 928  # the slide pipeline's tile with its margins (800 + 2 x 64)
SPEED_SEED = 778  # held out like HELD_OUT_SEED, for the timed tiles
VISITED_TILES = 28  # what the 8192 bench slide's budget visited (docs/BENCHMARKS.md)
EVERY_CANDIDATE = "fp32 NMS all"  # stardist's NMS on every candidate: the parity reference


class TimedNetwork:
    """A network whose every run is timed (the rest of ``detect`` is normalisation and NMS)."""

    def __init__(self, network: Any) -> None:
        self.network = network
        self.seconds: list[float] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.network.run(feeds)
        self.seconds.append(time.perf_counter() - start)
        return dict(out)

    def close(self) -> None:
        self.network.close()


@dataclass
class Variant:
    """One way of segmenting a tile: its detections in tile pixels."""

    name: str
    detect: Callable[[np.ndarray], Detections]
    network: TimedNetwork
    seconds: list[float] = field(default_factory=list)
    network_seconds: list[float] = field(default_factory=list)
    counts: MatchCounts = field(default_factory=lambda: MatchCounts(0, 0, 0))
    parity: MatchCounts = field(default_factory=lambda: MatchCounts(0, 0, 0))


def half_resolution(segmenter: Segmenter) -> Callable[[np.ndarray], Detections]:
    """Detect at 0.5 um/px (2 x 2 mean) and map the objects back to the tile's pixels."""

    def detect(image: np.ndarray) -> Detections:
        h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
        small = image[:h, :w, :3].astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3)
        found = segmenter.detect(np.round(small.mean(axis=(1, 3))).astype(np.uint8))
        return Detections(found.points * 2, found.dist * 2, found.prob)

    return detect


def run_variants_bench(
    segmenter_dir: Path,
    n_tiles: int,
    size: int,
    seed: int,
    threads: int,
    repeats: int = 3,
    speed_tiles: int = 3,
    slide: Path | None = None,
) -> list[Variant]:
    """fp32 against int8 candidates, a coarser working resolution and the NMS before
    star_nms (stardist's on every candidate): seconds per megapixel on tiles of the
    pipeline's size, for the whole of ``detect`` and for its network alone (the variants
    take turns on each tile, median of ``repeats``), F1 on the held-out tiles, and
    detection parity with fp32 and the NMS on every candidate (its objects matched at
    IoU 0.5, extra objects). With ``slide``: how much of
    the tiles the pipeline visits first a glass skip could leave out."""
    from export.segmenter_int8 import QUANTISED_OPS, quantise_candidate
    from runtime.backends.ort_cpu import OrtCpuBackend

    console = Console()
    section = segmenter_section(segmenter_dir)
    fp32_path = segmenter_dir / section["file"]
    fp32_network = OrtCpuBackend(fp32_path, "fp32", threads=threads)

    def make(name: str, network: Any, half: bool = False, every: bool = False) -> Variant:
        timed = TimedNetwork(network)
        segmenter = Segmenter(timed, section, threads, every_candidate=every)
        return Variant(name, half_resolution(segmenter) if half else segmenter.detect, timed)

    # The reference detections: fp32 with stardist's NMS on every candidate, as before
    # appliance/pipeline/star_nms.py.
    fp32 = Segmenter(fp32_network, section, threads, every_candidate=True)
    calibration, _ = segmentation_tiles(4, SPEED_PX, 1)  # the demo recipe's training seeds
    # int8: what export/segmenter_int8.py ships, then the choices it was preferred to.
    candidates = {
        "int8": {},
        "int8 +1st Conv": {"keep_first_conv": False},
        "int8 Conv only": {"ops": ("Conv",)},
        "int8 cal 512": {"calibration": 512},
    }
    variants = [make("fp32", fp32_network), make(EVERY_CANDIDATE, fp32_network, every=True)]
    with tempfile.TemporaryDirectory() as work:
        for index, (name, options) in enumerate(candidates.items()):
            path = Path(work) / f"candidate{index}.onnx"
            tiles = calibration
            if "calibration" in options:
                tiles, _ = segmentation_tiles(6, int(options["calibration"]), 1)
            quantise_candidate(
                fp32_path,
                path,
                section,
                tiles,
                ops=tuple(options.get("ops", QUANTISED_OPS)),
                keep_first_conv=bool(options.get("keep_first_conv", True)),
            )
            variants.append(make(name, OrtCpuBackend(path, "int8", threads=threads)))
        variants += openvino_variants(fp32_path, Path(work), threads, make)
    variants.append(make("fp32 half res", fp32_network, half=True))

    images, masks = segmentation_tiles(n_tiles, size, seed)
    for image, truth in zip(images, masks, strict=True):
        shape = (image.shape[0], image.shape[1])
        reference = fp32.detect(image)
        for variant in variants:
            found = reference if variant.name == EVERY_CANDIDATE else variant.detect(image)
            variant.counts = variant.counts + match_instances(truth, found.labels(shape), 0.5)
            variant.parity = variant.parity + match_detections(reference, found, shape)
    timed, _ = segmentation_tiles(speed_tiles, SPEED_PX, SPEED_SEED)
    for variant in variants:
        variant.detect(timed[0])  # warm-up
    for _ in range(repeats):
        for image in timed:
            for variant in variants:
                start = time.perf_counter()
                variant.detect(image)
                variant.seconds.append(time.perf_counter() - start)
                variant.network_seconds.append(variant.network.seconds[-1])

    megapixels = SPEED_PX * SPEED_PX / 1e6
    base = float(np.median(variants[0].seconds))
    table = Table(
        title=f"Segmentation variants: speed on {speed_tiles} tiles of {SPEED_PX} px x "
        f"{repeats}, F1 and parity with fp32 on {n_tiles} held-out tiles of {size} px"
    )
    columns = ("variant", "s / MP", "fp32 / variant", "network s / MP", "fp32 / variant")
    for column in (*columns, "F1 @ IoU 0.5", "fp32 matched", "extra"):
        table.add_column(column)
    base_network = float(np.median(variants[0].network_seconds))
    for variant in variants:
        median = float(np.median(variant.seconds))
        network = float(np.median(variant.network_seconds))
        reference = variant.parity.true_positives + variant.parity.false_negatives
        table.add_row(
            variant.name,
            f"{median / megapixels:.3f}",
            f"{base / median:.2f}x",
            f"{network / megapixels:.3f}",
            f"{base_network / network:.2f}x",
            f"{variant.counts.f1:.3f}",
            f"{variant.parity.true_positives} / {reference}",
            str(variant.parity.false_positives),
        )
    console.print(table)
    console.print(
        "int8: static QDQ as export/segmenter_int8.py makes it (first Conv fp32, "
        f"calibrated on 4 tiles of {SPEED_PX} px); +1st Conv: the first Conv quantised too; "
        "Conv only: ReLU, MaxPool, Concat left in float; cal 512: calibrated on 6 tiles of "
        "512 px; half res: the tile at 0.5 um/px (2 x 2 mean), objects scaled back; "
        f"{EVERY_CANDIDATE}: stardist's NMS on every candidate (the parity reference); "
        "OpenVINO: the fp32 network compiled at that inference precision"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(f"load average (1, 5, 15 min): {load}; {threads or 'all'} threads")
    if slide is not None:
        console.print(glass_share(slide, VISITED_TILES, int(section["div_by"][0])))
    return variants


def openvino_variants(
    fp32_path: Path, work: Path, threads: int, make: Callable[[str, Any], Variant]
) -> list[Variant]:
    """The fp32 network on OpenVINO at each precision this CPU runs, when installed."""
    from runtime.backends import ModelVariants, backend_class, open_model, plan_backends

    candidates, _ = plan_backends("openvino")
    if not candidates:
        return []
    found = []
    for precision in backend_class("openvino").precisions(ModelVariants(fp32_path)):
        settings = RuntimeSettings("openvino", threads, precision=precision)
        network = open_model(fp32_path, settings, engine_dir=work / "engines")
        found.append(make(f"OpenVINO {precision}", network))
    return found


def glass_share(slide: Path, first: int, div_by: int, margin: int = 48) -> str:
    """How much of the ``first`` tiles the pipeline visits (best-first, as
    appliance.pipeline.slides plans them) lies outside the bounding box of their stained pixels
    (padded by ``margin`` and rounded out to ``div_by``): the area a glass skip saves."""
    from scipy import ndimage

    from appliance.pipeline import qc, stain, tiles
    from appliance.readers import open_scan

    with open_scan(slide) as scan:
        zone = tiles.cellular_zone(scan)
        grid = tiles.tile_grid(scan, zone)
        sample = [t.core for t in tiles.iter_tiles(scan, tiles.sample_specs(grid, 8))]
        stains = stain.estimate_stains(sample)
        basophilic = tiles.in_bands(
            scan.thumbnail(zone.mask_um_per_px), lambda band: stain.basophilic(band, stains)
        )
        scores = tiles.tile_scores(basophilic, zone, qc.QCParams().min_basophilic)
        order = tiles.visiting_order(grid, scores)[:first]
        glass = np.asarray(zone.glass_rgb, np.float32)
        covered_share, box_share, empty = [], [], 0
        for tile in tiles.iter_tiles(scan, order):
            od = stain.optical_density(tile.image, glass).sum(axis=-1)
            covered = ndimage.binary_opening(od > tiles.COVER_OD, iterations=2)
            covered_share.append(float(covered.mean()))
            if not covered.any():
                empty += 1
                box_share.append(0.0)
                continue
            box = 1.0
            for axis in (0, 1):
                hit = np.nonzero(covered.any(axis=1 - axis))[0]
                side = covered.shape[axis]
                low = max(int(hit[0]) - margin, 0) // div_by * div_by
                high = min(-(-(int(hit[-1]) + 1 + margin) // div_by) * div_by, side)
                box *= (high - low) / side
            box_share.append(box)
    return (
        f"glass in the first {len(order)} tiles visited on {slide.name}: stained pixels "
        f"{np.mean(covered_share):.1%} of the tile area (min {np.min(covered_share):.1%}); "
        f"their bounding box (+{margin} px, rounded to {div_by}) {np.mean(box_share):.1%} "
        f"(min {np.min(box_share):.1%}); empty tiles {empty}. A glass skip would save "
        f"{1 - np.mean(box_share):.1%} of the network's area"
    )
