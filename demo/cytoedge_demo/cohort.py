"""The demo's labelled synthetic cohorts, written as a site would hand them over: scans on
disk and a cases table (``appliance.validation.cases_table``) for training and one for held-out
validation.

Myeloma: one smear per case, each marker positive on half the cases of a split
(hidden morphology, ``synthetic.SmearSpec.labels``). Peripheral blood: one folder of
single-cell crops per patient, the eight classes in equal numbers, and a hemoglobin
drawn around its class's typical value (the demo head's regression has only the
class to go on). Each workload also gets a table of its own per split: a myeloma head
that reads plasma cells and a blood head that reads every cell are trained in two
runs (docs/training.md, "Bags of some classes").

Labelled cells for the demo's cell head (``write_labelled_cells``), whose kinds the
generator knows, named as classes of the marrow-mll taxonomy (``KIND_CLASSES``):
class folders of single-cell crops, one folder per synthetic donor above them (the
blood patients' crops), and a points table on labelled smears from their truth (the
myeloma smears' cells, cut by the pipeline as it cuts them). The held-out myeloma
smears' cells get a points table too, to measure the cell head where the myeloma
head reads it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cytoedge_demo import synthetic
from export.probe_cells import KINDS, single_cell
from runtime.labels import DIAGNOSIS, HEMOGLOBIN, MYELOMA_MARKERS, PB_CLASSES

# g/dL: anaemia in marrow failure and leukaemia, a high value in MPN (polycythaemia).
HEMOGLOBIN_BY_CLASS = {
    "acute leukemia": 8.5,
    "lymphoma": 11.5,
    "MDS": 9.5,
    "MDS/MPN": 10.5,
    "MPN": 16.0,
    "plasma cell neoplasm": 10.0,
    "reactive changes": 12.5,
    "healthy": 14.5,
}
HEMOGLOBIN_SD = 0.8
SPLITS = ("train", "holdout")
WORKLOADS = ("myeloma", "blood")
# The generator's kinds of nucleated cell as classes of the marrow-mll taxonomy.
KIND_CLASSES = {
    "plasma": "plasma_cell",
    "lymphocyte": "lymphocyte",
    "neutrophil": "segmented_neutrophil",
    "blast": "blast",
}
POINT_HEADER = ("image", "x_px", "y_px", "class", "group")


@dataclass(frozen=True)
class CohortSizes:
    mm_cases: dict[str, int]  # per split
    pb_patients: dict[str, int]  # per split, multiples of the 8 classes keep them equal
    pb_cells: int
    slide_px: int
    nucleated_per_mm2: float
    plasma_fraction: float
    seed: int


@dataclass(frozen=True)
class LabelledCellSizes:
    donors: dict[str, int]  # per split: synthetic donors of class folders, a group each
    crops_per_kind: int  # crops of each kind per donor
    smears: int  # labelled smears (training only) whose nucleated cells are the points


def _mm_specs(sizes: CohortSizes, split: str, seed: int) -> list[synthetic.SmearSpec]:
    rng = np.random.default_rng([sizes.seed, SPLITS.index(split)])
    count = sizes.mm_cases[split]
    columns = [rng.permutation(np.arange(count) % 2 == 0) for _ in MYELOMA_MARKERS]
    return [
        synthetic.SmearSpec(
            width=sizes.slide_px,
            height=sizes.slide_px,
            seed=seed + i,
            labels={m: bool(columns[t][i]) for t, m in enumerate(MYELOMA_MARKERS)},
            nucleated_per_mm2=sizes.nucleated_per_mm2,
            plasma_fraction=sizes.plasma_fraction,
        )
        for i in range(count)
    ]


def write_cohorts(
    root: Path, sizes: CohortSizes, progress: Callable[[float], None]
) -> dict[str, Path]:
    """Scans under ``root`` and the cases tables: ``{split}`` (both workloads) and
    ``{split}-{workload}`` per split; ``holdout-cells``: the points of the held-out
    smears' nucleated cells, when there are any."""
    total = sum(sizes.mm_cases.values()) + sum(sizes.pb_patients.values())
    done = 0
    tables = {}
    for index, split in enumerate(SPLITS):
        rows: list[dict[str, str]] = []
        points: list[tuple[str, ...]] = []
        folder = root / "mm" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(_mm_specs(sizes, split, sizes.seed * 1000 + 500 * index)):
            path = folder / f"smear-{i + 1:03d}.tif"
            truth = synthetic.write_smear(path, spec)
            path.with_name(f"{path.stem}.truth.json").unlink(missing_ok=True)
            labels = spec.labels or {}
            case_id = f"MM-{split}-{i + 1:03d}"
            rows.append(
                {
                    "case_id": case_id,
                    "scans": str(path.relative_to(root)),
                    **{m: "1" if labels[m] else "0" for m in MYELOMA_MARKERS},
                }
            )
            points += truth_points(truth, str(path.relative_to(root)), case_id)
            done += 1
            progress(done / total)
        patients = sizes.pb_patients[split]
        if patients:
            classes = [PB_CLASSES[i % len(PB_CLASSES)] for i in range(patients)]
            pb_root = root / "pb" / split
            drawn = synthetic.write_cell_folders(
                pb_root, patients, sizes.pb_cells, seed=sizes.seed % 10_000 + index, classes=classes
            )
            rng = np.random.default_rng([sizes.seed, 7, index])
            for patient, cls in drawn.items():
                hemoglobin = HEMOGLOBIN_BY_CLASS[cls] + rng.normal(0, HEMOGLOBIN_SD)
                rows.append(
                    {
                        "case_id": f"PB-{split}-{patient}",
                        "scans": str((pb_root / patient).relative_to(root)),
                        DIAGNOSIS: cls,
                        HEMOGLOBIN: f"{hemoglobin:.1f}",
                    }
                )
            done += patients
            progress(done / total)
        tables[split] = _write_table(root / f"{split}.csv", rows)
        for workload, prefix in zip(WORKLOADS, ("MM-", "PB-"), strict=True):
            of_workload = [row for row in rows if row["case_id"].startswith(prefix)]
            if of_workload:
                name = f"{split}-{workload}"
                tables[name] = _write_table(root / f"{name}.csv", of_workload)
        if split == "holdout" and points:
            tables["holdout-cells"] = write_points(root / "holdout-cells.csv", points)
    return tables


def truth_points(truth: synthetic.SlideTruth, image: str, group: str) -> list[tuple[str, ...]]:
    """A points table's rows for a smear's nucleated cells as the generator placed them
    (those whose centre lies on the slide), in the slide's level-0 pixels."""
    width, height = truth.spec["width"], truth.spec["height"]
    return [
        (image, f"{cell.x:.1f}", f"{cell.y:.1f}", KIND_CLASSES[cell.kind], group)
        for cell in truth.cells
        if 0 <= cell.x < width and 0 <= cell.y < height
    ]


def write_points(path: Path, rows: list[tuple[str, ...]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([POINT_HEADER, *rows])
    return path


def write_labelled_cells(
    root: Path, cohort: CohortSizes, sizes: LabelledCellSizes, progress: Callable[[float], None]
) -> dict[str, Path]:
    """Labelled cells of the generator's four kinds under ``root``: ``crops`` and
    ``holdout-crops``, class folders of single-cell crops (``<donor>/<class>/NNN.png``,
    as the blood patients' folders hold them), and ``points``, a points table on
    ``sizes.smears`` labelled smears drawn as the myeloma smears are (their truth
    gives each cell's kind and place). A smear draws no blasts: they come from the
    crops alone."""
    total = sum(sizes.donors.values()) + sizes.smears
    done = 0
    written = {}
    for index, split in enumerate(SPLITS):
        if not sizes.donors.get(split):
            continue
        folder = root / ("crops" if split == "train" else f"{split}-crops")
        rng = np.random.default_rng([cohort.seed, 11, index])
        for donor in range(sizes.donors[split]):
            for kind in KINDS:
                place = folder / f"donor-{donor + 1:03d}" / KIND_CLASSES[kind]
                place.mkdir(parents=True, exist_ok=True)
                for n in range(sizes.crops_per_kind):
                    # Stains of their own: the blood patients' crops count from seed % 10_000.
                    seed = (cohort.seed % 10_000 + 50 + index) * 100_003 + donor * 1_009 + n
                    crop = single_cell(rng, kind, synthetic.PB_CROP_PX, seed)
                    Image.fromarray(crop).save(place / f"{n + 1:03d}.png")
            done += 1
            progress(done / total)
        written[folder.name] = folder
    points: list[tuple[str, ...]] = []
    smears = root / "smears"
    smears.mkdir(parents=True, exist_ok=True)
    for i in range(sizes.smears):
        path = smears / f"labelled-{i + 1:03d}.tif"
        spec = synthetic.SmearSpec(
            width=cohort.slide_px,
            height=cohort.slide_px,
            seed=cohort.seed * 1000 + 900 + i,
            nucleated_per_mm2=cohort.nucleated_per_mm2,
            plasma_fraction=cohort.plasma_fraction,
        )
        truth = synthetic.write_smear(path, spec)
        synthetic.truth_path(path).unlink(missing_ok=True)
        points += truth_points(truth, str(path.relative_to(root)), path.stem)
        done += 1
        progress(done / total)
    if points:
        written["points"] = write_points(root / "points.csv", points)
    return written


def _write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["case_id", "scans", *MYELOMA_MARKERS, DIAGNOSIS, HEMOGLOBIN]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
