"""The demo's labelled synthetic cohorts, written as a site would hand them over: scans on
disk and a cases table (``appliance.validation.cases_table``) for training and one for held-out
validation.

Myeloma: one smear per case, each marker positive on half the cases of a split
(hidden morphology, ``synthetic.SmearSpec.labels``). Peripheral blood: one folder of
single-cell crops per patient, the eight classes in equal numbers, and a hemoglobin
drawn around its class's typical value (the demo head's regression has only the
class to go on).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cytoedge_demo import synthetic
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


@dataclass(frozen=True)
class CohortSizes:
    mm_cases: dict[str, int]  # per split
    pb_patients: dict[str, int]  # per split, multiples of the 8 classes keep them equal
    pb_cells: int
    slide_px: int
    nucleated_per_mm2: float
    plasma_fraction: float
    seed: int


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
    """Scans under ``root`` and one cases table per split: {split: table path}."""
    total = sum(sizes.mm_cases.values()) + sum(sizes.pb_patients.values())
    done = 0
    tables = {}
    for index, split in enumerate(SPLITS):
        rows: list[dict[str, str]] = []
        folder = root / "mm" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(_mm_specs(sizes, split, sizes.seed * 1000 + 500 * index)):
            path = folder / f"smear-{i + 1:03d}.tif"
            synthetic.write_smear(path, spec)
            path.with_name(f"{path.stem}.truth.json").unlink(missing_ok=True)
            labels = spec.labels or {}
            rows.append(
                {
                    "case_id": f"MM-{split}-{i + 1:03d}",
                    "scans": str(path.relative_to(root)),
                    **{m: "1" if labels[m] else "0" for m in MYELOMA_MARKERS},
                }
            )
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
    return tables


def _write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["case_id", "scans", *MYELOMA_MARKERS, DIAGNOSIS, HEMOGLOBIN]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
