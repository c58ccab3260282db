"""Result folders with a cell head's differential, written by the appliance's own result
writer from hand-made content: a sample myeloma case (cytoedge_demo.samples) with the
differential of given class counts (Wilson intervals by the pipeline's function), the
plasma-cell burden and its inclusion rule, each top cell's class, and crops of each
class's cells and of the unsure ones. For the report, the window and re-labelling."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from appliance.pipeline.case_outputs import UNSURE_FOLDER
from appliance.pipeline.differential import wilson_interval
from appliance.results import (
    BurdenRecord,
    CaseContent,
    ClassCount,
    Differential,
    GalleryCell,
    ResultFolder,
    write_case_result,
)
from appliance.service.store import STORE_FILE, JobStore
from cytoedge_demo.samples import SampleCase, add_case, draw_cell, sample_content
from runtime.taxonomy import PLASMA_CELLS, Taxonomy, load_taxonomy

CROPS_PER_CLASS = 3
UNSURE_CROPS = 8
MARROW_COUNTS = (31, 12, 0, 40, 35, 22, 61, 9, 1, 2, 14, 3, 48, 27, 4, 0, 23, 6, 5, 2, 3)


def share(count: int, total: int) -> tuple[float, float, float]:
    """Percent and its Wilson 95 % interval, in percent."""
    low, high = wilson_interval(count, total)
    return 100 * count / total, 100 * low, 100 * high


def differential_content(
    case_id: str,
    taxonomy: Taxonomy,
    counts: Sequence[int],
    unsure: int,
    *,
    slides: tuple[str, ...] = ("s1.svs",),
    seed: int = 0,
    minimum: float = 10.0,
    rule: str = "warn",
    operating_point: float = 0.8,
) -> CaseContent:
    """A scored case whose kept cells are ``counts`` per class of ``taxonomy`` and
    ``unsure`` cells below the operating point."""
    content = sample_content(case_id, "mm_positive", slides, seed)
    rng = np.random.default_rng(seed)
    classified = sum(counts)
    rows = tuple(
        ClassCount(c.name, c.label, n, *share(n, classified), c.colour)
        for c, n in zip(taxonomy.classes, counts, strict=True)
    )
    found = Differential(
        head="cells",
        taxonomy=taxonomy.name,
        cells=classified + unsure,
        classified=classified,
        unsure=unsure,
        operating_point=operating_point,
        target_accuracy=0.99,
        classes=rows,
    )
    burden = None
    group = taxonomy.group(PLASMA_CELLS)
    if group:
        plasma = sum(r.count for r in rows if r.name in group)
        percent, low, high = share(plasma, classified)
        burden = BurdenRecord(
            PLASMA_CELLS, "Plasma cells", plasma, classified, percent, low, high, minimum,
            rule,  # type: ignore[arg-type]
        )  # fmt: skip
    warned = burden is not None and burden.below and rule == "warn"
    slide_ids = [scan.slide_id for scan in content.result.scans]
    weights = np.asarray(counts, float) / classified
    top = tuple(
        dataclasses.replace(
            cell,
            cell_class=taxonomy.names[int(rng.choice(len(weights), p=weights))],
            confidence=round(float(rng.uniform(0.5, 1.0)), 4),
            sure=bool(rng.uniform() < 0.85),
        )
        for cell in content.result.top_cells
    )
    gallery: list[GalleryCell] = []
    patches: list[np.ndarray] = []
    cell_ids = iter(rng.permutation(100_000) + 1)
    chosen = [
        (c.name, c.name, True, np.linspace(0.99, 0.9, min(n, CROPS_PER_CLASS)))
        for c, n in zip(taxonomy.classes, counts, strict=True)
    ]
    guesses = rng.choice(taxonomy.names, min(unsure, UNSURE_CROPS))
    low_first = np.linspace(0.3, operating_point - 0.05, len(guesses))
    chosen += [
        (UNSURE_FOLDER, str(g), False, np.array([c]))
        for g, c in zip(guesses, low_first, strict=True)
    ]
    numbers: dict[str, int] = {}
    for folder, name, sure, confidences in chosen:
        for confidence in confidences:
            numbers[folder] = numbers.get(folder, 0) + 1
            gallery.append(
                GalleryCell(
                    slide=slide_ids[len(gallery) % len(slide_ids)],
                    cell_id=int(next(cell_ids)),
                    cell_class=name,
                    confidence=round(float(confidence), 4),
                    sure=sure,
                    image=f"cells/{folder}/{numbers[folder]:02d}.png",
                )
            )
            patches.append(draw_cell(rng, plasma_like=name in group))
    result = dataclasses.replace(
        content.result,
        top_cells=top,
        differential=found,
        burden=burden,
        warnings=(burden.sentence(),) if warned and burden is not None else (),
        cell_gallery=tuple(gallery),
    )
    return dataclasses.replace(content, result=result, cell_gallery_patches=patches)


def write_differential_case(
    outbox: Path,
    case_id: str,
    taxonomy: Taxonomy,
    counts: Sequence[int],
    unsure: int,
    *,
    write_pdf: bool = False,
    **options: object,
) -> ResultFolder:
    """``differential_content`` written as the case's next version."""
    content = differential_content(case_id, taxonomy, counts, unsure, **options)  # type: ignore[arg-type]
    folder, _ = write_case_result(outbox, content, write_pdf=write_pdf)
    return folder


# The window's cases with a differential: marrow-mll's 21 classes below the plasma-cell
# minimum on three slides, and two classes within it on one.
CELL_CASES = ("MM-2611-0421", "MM-2611-0420")


def write_cell_site(data_dir: Path) -> tuple[Path, Path]:
    """A job store and an outbox holding the CELL_CASES, done and waiting for review:
    (store path, outbox), as the service leaves them."""
    store_path = data_dir / "state" / STORE_FILE
    outbox = data_dir / "outbox"
    cases = (
        (
            load_taxonomy("marrow-mll"),
            MARROW_COUNTS,
            41,
            ("0421_1.svs", "0421_2.svs", "0421_3.svs"),
        ),
        (
            load_taxonomy("marrow-mll").restricted(("plasma_cell", "other_cell")),
            (97, 318),
            23,
            ("0420_1.svs",),
        ),
    )
    store = JobStore(store_path)
    try:
        for minutes, (key, (taxonomy, counts, unsure, slides)) in enumerate(
            zip(CELL_CASES, cases, strict=True)
        ):
            folder = write_differential_case(
                outbox, key, taxonomy, counts, unsure, slides=slides, seed=minutes
            )
            case = SampleCase(key, "done", 5 + minutes, slides, kind="mm_positive")
            add_case(store, case, now=time.time(), result=folder)
    finally:
        store.close()
    return store_path, outbox
