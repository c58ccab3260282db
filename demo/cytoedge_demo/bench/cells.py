"""``cytoedge bench cells``: a cell head trained on real labelled cells by the product's
path and measured on images it never saw, against two baselines on the same cells in
the same run.

The data is Chula RBC-12's layout: photos ``N.jpg`` with ``N.txt`` beside them, one
labelled red cell a line, ``x y class`` (its centre in the photo's pixels, its class
0-12 in the ``rbc-morphology`` taxonomy's order). The photos are split once, seeded,
into training and held-out images, grouped: no image is on both sides, since the cells
of one field share its stain, focus and patient. Both sides are read as points tables
by the appliance's own cell path (``appliance.validation.labelled_cells``: each photo
through the field pipeline at ``--pixel-size``, each point matched to a kept cell or
cropped around as the pipeline crops, embedded by the bundle's encoder); the cell head
is trained on the training images alone (``export.train_cells``, its folds grouped by
image) and classifies the held-out cells as the service would (the ensemble, the
calibration, the operating point chosen out of fold). Beside it, on the same held-out
cells: the majority class of the training cells, and a logistic regression on simple
colour and shape features of the same crops (``shape_colour_features``). The figures
are over the whole taxonomy, so a class the head could not be trained on (too few
cells or images) counts against it as against the baselines. Then the cost per cell
of the cell head beside the encoder's, on the same held-out cells.
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage, optimize

from appliance.pipeline.cells import resize_bilinear
from appliance.pipeline.networks import SlideNetworks
from appliance.validation.cell_measures import CellFigures, cell_figures
from appliance.validation.cohort import PipelineSettings
from appliance.validation.labelled_cells import LabelledCells, read_labelled_cells
from cytoedge_demo.bench.gemm import cpu_description
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle, load_bundle
from runtime.head_kinds.cell_classifier import CONFIDENCE
from runtime.taxonomy import Taxonomy, load_taxonomy

# Chula RBC-12 records no pixel size; its README: red cells are about 35-40 px across,
# and a red cell is about 7.5 um, which puts the camera near 0.2 um/px.
CHULA_UM = 0.2
TAXONOMY = "rbc-morphology"  # Chula RBC-12's 13 classes, in its label order 0-12
WORKING_UM = 0.25  # the pipeline's grid, at which the crops are cut
GLASS_PERCENTILE = 90  # a crop's glass: its brightest tenth
CELL_DARKER = 0.06  # a cell's pixels: this much darker than the glass (0-1 grey)
RING_PX = 6  # the surroundings of a cell: this far beyond its outline
TIMED_CELLS = 256  # cells the costs per cell are timed on


@dataclass(frozen=True)
class Split:
    train: list[Path]
    held_out: list[Path]


def labelled_images(data: Path) -> list[Path]:
    """The photos of ``data`` with a label file beside them, by number."""
    photos = [p for p in data.glob("*.jpg") if p.with_suffix(".txt").is_file()]
    return sorted(photos, key=lambda p: (len(p.stem), p.stem))


def image_split(images: Sequence[Path], held_out: float, seed: int, limit: int = 0) -> Split:
    """A seeded share ``held_out`` of the images (of ``limit`` drawn first, when given)
    held out, the rest for training."""
    order = np.random.default_rng(seed).permutation(len(images))
    chosen = [images[i] for i in order[: limit or len(images)]]
    count = max(1, round(held_out * len(chosen)))
    return Split(train=sorted(chosen[count:]), held_out=sorted(chosen[:count]))


def write_points(table: Path, images: Sequence[Path], taxonomy: Taxonomy) -> Path:
    """A points table (docs/cells.md) of the images' labelled cells: each photo by its
    path, the class by its name; without a group column, each photo is its group."""
    rows = []
    for image in images:
        for line in image.with_suffix(".txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                x, y, label = line.split()
                rows.append((str(image.resolve()), x, y, taxonomy.names[int(label)]))
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image", "x_px", "y_px", "class"), *rows])
    return table


def networks_only(bundle: Bundle) -> Bundle:
    """The bundle's networks without its case heads: a cell head of other classes is
    trained for them, and a case head's bag would name classes it does not have."""
    return dataclasses.replace(bundle, heads=())


def head_probabilities(bundle: Bundle, cells: LabelledCells) -> np.ndarray:
    """(N, C) the bundle's cell head's calibrated probabilities of the cells, as the
    service classifies a kept cell, in the order of the cells' taxonomy (0 for a class
    the head does not have)."""
    spec = bundle.cell_head
    assert spec is not None
    with SlideNetworks(bundle) as networks:
        raw = networks.classify(cells.embeddings)
    calibrated = spec.head_kind.calibrate(spec, raw)
    out = np.zeros((len(cells), len(cells.taxonomy.names)))
    for column, name in enumerate(bundle.cell_classes):
        out[:, cells.taxonomy.index(name)] = calibrated[:, column]
    return out


def majority_probabilities(train: Sequence[str], count: int, taxonomy: Taxonomy) -> np.ndarray:
    """Every cell called the most frequent class of ``train``, with certainty."""
    names, counts = np.unique(np.array(train), return_counts=True)
    out = np.zeros((count, len(taxonomy.names)))
    out[:, taxonomy.index(str(names[counts.argmax()]))] = 1.0
    return out


# --- the colour-and-shape baseline ----------------------------------------------------


def _cell_mask(grey: np.ndarray) -> np.ndarray:
    """The cell at the crop's centre: the pixels darker than the glass, holes (a red
    cell's pale centre) filled, the connected part nearest the centre."""
    glass = np.percentile(grey, GLASS_PERCENTILE)
    parts, count = ndimage.label(ndimage.binary_fill_holes(grey < glass - CELL_DARKER))
    if not count:
        return np.zeros_like(grey, bool)
    centre = np.array(grey.shape) / 2.0
    rows, cols = np.nonzero(parts)
    nearest = np.argmin(np.hypot(rows - centre[0], cols - centre[1]))
    return parts == parts[rows[nearest], cols[nearest]]


def shape_colour_features(patches: np.ndarray) -> np.ndarray:
    """(N, 14) per crop (at the working grid, the cell at its centre): the cell's area
    (um2), elongation (major over minor axis) and circularity; the mean and spread of
    each channel inside it; the mean of each channel in the ring around it; its central
    pallor (the centre's brightness over its rim's); and how far its centre lies from
    the crop's (um)."""
    out = np.zeros((len(patches), 14))
    ring = ndimage.generate_binary_structure(2, 1)
    for index, patch in enumerate(patches):
        rgb = np.asarray(patch, np.float64) / 255.0
        grey = rgb.mean(axis=2)
        mask = _cell_mask(grey)
        area = int(mask.sum())
        if area < 4:
            continue  # nothing darker than the glass: all zeros
        rows, cols = np.nonzero(mask)
        centre = np.array([rows.mean(), cols.mean()])
        low, high = np.sort(np.linalg.eigvalsh(np.cov(np.vstack([rows, cols])) + 1e-6 * np.eye(2)))
        edge = mask & ~ndimage.binary_erosion(mask, ring)
        around = ndimage.binary_dilation(mask, ring, iterations=RING_PX) & ~mask
        radius = np.sqrt(area / np.pi)
        distance = np.hypot(*(np.indices(mask.shape) - centre[:, None, None]))
        middle, rim = mask & (distance < 0.35 * radius), mask & (distance >= 0.6 * radius)
        pallor = grey[middle].mean() / max(grey[rim].mean(), 1e-6) if middle.any() else 1.0
        inside = rgb[mask]
        out[index] = [
            area * WORKING_UM**2,
            np.sqrt(high / low),
            4 * np.pi * area / max(edge.sum(), 1) ** 2,
            *inside.mean(axis=0),
            *inside.std(axis=0),
            *(rgb[around].mean(axis=0) if around.any() else np.zeros(3)),
            pallor,
            np.hypot(*(centre - np.array(mask.shape) / 2.0)) * WORKING_UM,
        ]
    return out


@dataclass(frozen=True)
class LogisticBaseline:
    """Multinomial logistic regression on standardised features, L2-penalised, each
    cell weighed ~ 1 / sqrt(its class's frequency) as the cell head weighs them."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (F + 1, C)

    @classmethod
    def fit(cls, features: np.ndarray, truth: np.ndarray, classes: int, l2: float = 1e-2):
        mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-9
        x = np.hstack([(features - mean) / scale, np.ones((len(features), 1))])
        onehot = np.eye(classes)[truth]
        frequency = np.bincount(truth, minlength=classes) / len(truth)
        weight = (1.0 / np.sqrt(np.maximum(frequency, 1e-12)))[truth]
        weight /= weight.sum()

        def loss(flat: np.ndarray) -> tuple[float, np.ndarray]:
            w = flat.reshape(x.shape[1], classes)
            p = _softmax(x @ w)
            value = -(weight * np.log(p[onehot > 0] + 1e-12)).sum() + l2 * (w[:-1] ** 2).sum()
            gradient = x.T @ ((p - onehot) * weight[:, None])
            gradient[:-1] += 2 * l2 * w[:-1]
            return float(value), gradient.ravel()

        start = np.zeros(x.shape[1] * classes)
        found = optimize.minimize(loss, start, jac=True, method="L-BFGS-B")
        return cls(mean, scale, found.x.reshape(x.shape[1], classes))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        x = np.hstack([(features - self.mean) / self.scale, np.ones((len(features), 1))])
        return _softmax(x @ self.weights)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- the run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutRun:
    train: LabelledCells
    held_out: LabelledCells
    bundle: Bundle  # the base's networks with the cell head trained on ``train``


def train_and_hold_out(
    split: Split,
    base: Bundle,
    pipeline: PipelineSettings,
    console: Console,
    work: Path,
    *,
    folds: int,
    seed: int,
) -> HeldOutRun:
    """Both sides read by the appliance's cell path with ``base``'s networks, and a cell
    head trained on the training images alone (its folds grouped by image)."""
    from export.train_cells import CellOptions, train_cell_head

    taxonomy = load_taxonomy(TAXONOMY)
    with SlideNetworks(base, pipeline.runtime) as networks:
        sides = [
            read_labelled_cells(
                write_points(work / name, images, taxonomy), taxonomy, networks, pipeline, console
            )
            for name, images in (("train.csv", split.train), ("held-out.csv", split.held_out))
        ]
    made = train_cell_head(
        sides[0],
        base,
        console,
        destination=work / "trained",
        version=f"{base.version}-cells",
        source="train.csv",
        options=CellOptions(folds=folds, seed=seed),
    )
    return HeldOutRun(sides[0], sides[1], made.bundle)


def head_figures(bundle: Bundle, cells: LabelledCells) -> CellFigures:
    """The bundle's cell head on ``cells``, at its own operating point, over the cells'
    whole taxonomy."""
    spec = bundle.cell_head
    assert spec is not None
    return cell_figures(
        cells.taxonomy,
        cells.labels,
        head_probabilities(bundle, cells),
        target_accuracy=spec.params.target_accuracy,
        confidence_needed=spec.thresholds[CONFIDENCE],
    )


@dataclass(frozen=True)
class CellBenchResult:
    head: CellFigures
    majority: CellFigures
    logistic: CellFigures
    train_cells: int
    classes_trained: tuple[str, ...]
    embed_ms: float  # per cell, the encoder (crop resized and embedded)
    classify_ms: float  # per cell, the cell head (ensemble and calibration)


def run_cells_bench(
    data: Path,
    bundle_dir: Path,
    console: Console,
    *,
    pixel_size: float = CHULA_UM,
    held_out: float = 0.3,
    seed: int = 0,
    limit: int = 0,
    folds: int = 5,
    cache: Path | None = None,
) -> CellBenchResult:
    """Split, read, train, measure and print (module docstring)."""
    base = networks_only(load_bundle(bundle_dir))
    split = image_split(labelled_images(data), held_out, seed, limit)
    console.print(
        f"{data}: {len(split.train)} training and {len(split.held_out)} held-out images "
        f"(seed {seed}) at {pixel_size} um/px; bundle {base.name} {base.version}, encoder "
        f"{base.encoder.architecture}"
    )
    with tempfile.TemporaryDirectory(prefix="cytoedge-bench-cells-") as work:
        folder = Path(work)
        pipeline = PipelineSettings(cache or folder / "cache", RuntimeSettings(), pixel_size)
        run = train_and_hold_out(split, base, pipeline, console, folder, folds=folds, seed=seed)
        head = head_figures(run.bundle, run.held_out)
        embed_ms, classify_ms = _costs(run.bundle, run.held_out)
    train, test, taxonomy = run.train, run.held_out, run.train.taxonomy
    majority = cell_figures(
        taxonomy, test.labels, majority_probabilities(train.labels, len(test), taxonomy)
    )
    started = time.perf_counter()
    truth = np.array([taxonomy.index(label) for label in train.labels])
    logistic = LogisticBaseline.fit(
        shape_colour_features(np.asarray(train.patches)), truth, len(taxonomy.names)
    )
    baseline = logistic.probabilities(shape_colour_features(np.asarray(test.patches)))
    console.print(f"Colour and shape baseline: {time.perf_counter() - started:.0f} s")
    result = CellBenchResult(
        head=head,
        majority=majority,
        logistic=cell_figures(taxonomy, test.labels, baseline),
        train_cells=len(train),
        classes_trained=run.bundle.cell_classes,
        embed_ms=embed_ms,
        classify_ms=classify_ms,
    )
    _print(result, base, console)
    return result


def _costs(bundle: Bundle, cells: LabelledCells) -> tuple[float, float]:
    """ms per cell of the encoder (resize and embed) and of the cell head (the ensemble
    and its calibration) on the same cells: the first ``TIMED_CELLS`` held-out crops."""
    spec = bundle.cell_head
    assert spec is not None
    crops = np.asarray(cells.patches[:TIMED_CELLS])
    size = bundle.encoder.input.fed_px
    with SlideNetworks(bundle) as networks:
        networks.classify(cells.embeddings[:1])  # the sessions open untimed
        networks.embed(np.stack([resize_bilinear(crops[0], size)]), progress=_quiet)
        started = time.perf_counter()
        inputs = np.stack([resize_bilinear(crop, size) for crop in crops])
        embeddings = networks.embed(inputs, progress=_quiet)
        embed = time.perf_counter() - started
        repeats = 20  # the head is fast: timed over repeats for a steady figure
        started = time.perf_counter()
        for _ in range(repeats):
            spec.head_kind.calibrate(spec, networks.classify(embeddings))
        classify = (time.perf_counter() - started) / repeats
    return 1000 * embed / len(crops), 1000 * classify / len(crops)


def _quiet(done: int, total: int) -> None:
    """The encoder's progress, not shown."""


def _figure(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.3f}"


def _print(result: CellBenchResult, base: Bundle, console: Console) -> None:
    table = Table(title=f"cytoedge bench cells: {result.head.cells} held-out cells")
    for column in ("predictor", "macro F1", "weighted F1", "accuracy", "coverage", "acc. at op."):
        table.add_column(column, justify="left" if column == "predictor" else "right")
    point = result.head.operating_point
    table.add_row(
        "cell head",
        _figure(result.head.macro_f1),
        _figure(result.head.weighted_f1),
        _figure(result.head.accuracy),
        f"{point.coverage:.1%}",
        _figure(point.accuracy),
    )
    for name, figures in (
        ("majority class", result.majority),
        ("colour and shape, logistic", result.logistic),
    ):
        table.add_row(
            name,
            _figure(figures.macro_f1),
            _figure(figures.weighted_f1),
            _figure(figures.accuracy),
            "-",
            "-",
        )
    console.print(table)
    console.print(
        f"Encoder {base.encoder.architecture} of {base.name} {base.version}; trained on "
        f"{result.train_cells} cells of {len(result.classes_trained)} classes; "
        f"operating point {point.confidence:.3f} chosen out of fold for "
        f"{result.head.target_accuracy:.0%}"
    )
    console.print(
        f"Per cell: encoder {result.embed_ms:.2f} ms, cell head {result.classify_ms:.3f} ms "
        f"({result.classify_ms / result.embed_ms:.2%} of the encoder's), on "
        f"{min(TIMED_CELLS, result.head.cells)} held-out crops"
    )
    console.print(cpu_description())
