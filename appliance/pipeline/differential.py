"""The differential: which cells a case's slides hold, by the bundle's cell head.

Every kept cell of the slides that passed QC gets a class and a calibrated confidence,
or is *unsure* below the head's operating point (``runtime.head_kinds.cell_classifier``).
The differential counts each class among the classified cells with a Wilson 95 %
interval of its share, and the unsure cells apart (they are the cells a person looks
at). For a case of slide scans whose cell head knows plasma cells, the share of
plasma cells is the paper's inclusion criterion (METHOD.md A: slides below 10 % were
excluded, the IMWG minimum): ``burden`` reports it against ``qc.min_plasma_cell_fraction``
and ``qc.plasma_cell_rule`` says what a case below it gets (a warning, no call, nothing).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from appliance.results.schema import BurdenRecord, ClassCount, Differential
from runtime.bundle_format import Bundle
from runtime.head_kinds import CellCalls, CellHeadKind
from runtime.head_kinds.cell_classifier import CONFIDENCE, CellClassifierParams
from runtime.taxonomy import PLASMA_CELLS

Z_95 = 1.959963984540054  # the normal quantile of 0.975


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (NaN, NaN) when ``total`` is 0."""
    if total <= 0:
        return float("nan"), float("nan")
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def classify(bundle: Bundle, probabilities: np.ndarray) -> CellCalls:
    """The cell head's calls for rows of its (uncalibrated) class probabilities."""
    spec = bundle.cell_head
    kind = spec.head_kind if spec is not None else None
    if spec is None or not isinstance(kind, CellHeadKind):
        raise ValueError(f"bundle {bundle.name} {bundle.version} has no cell head")
    return kind.classify(spec, probabilities)


def differential(bundle: Bundle, calls: Sequence[CellCalls]) -> Differential | None:
    """The case's differential over the calls of its slides (None without a cell head)."""
    spec = bundle.cell_head
    if spec is None:
        return None
    params: CellClassifierParams = spec.params
    classes = np.concatenate([c.classes for c in calls]) if calls else np.zeros(0, np.int64)
    sure = np.concatenate([c.sure for c in calls]) if calls else np.zeros(0, bool)
    classified = int(sure.sum())
    counts = np.bincount(classes[sure], minlength=len(spec.outputs))
    rows = []
    for index, cell_class in enumerate(params.taxonomy.classes):
        low, high = wilson_interval(int(counts[index]), classified)
        rows.append(
            ClassCount(
                name=cell_class.name,
                label=spec.labels.get(cell_class.name, cell_class.label),
                count=int(counts[index]),
                percent=_percent(int(counts[index]), classified),
                low=100 * low if classified else 0.0,
                high=100 * high if classified else 0.0,
                colour=cell_class.colour,
            )
        )
    return Differential(
        head=spec.name,
        taxonomy=params.taxonomy.name,
        cells=len(classes),
        classified=classified,
        unsure=len(classes) - classified,
        operating_point=float(spec.thresholds[CONFIDENCE]),
        target_accuracy=params.target_accuracy,
        classes=tuple(rows),
    )


def burden(
    bundle: Bundle, found: Differential | None, inputs: Collection[str]
) -> BurdenRecord | None:
    """The plasma-cell share of a case of slide scans, when the cell head knows plasma
    cells and the case kept cells (None otherwise: a case whose scans all failed QC
    abstains for that)."""
    if found is None or not found.cells or "scans" not in inputs or bundle.cell_head is None:
        return None
    params: CellClassifierParams = bundle.cell_head.params
    group = params.taxonomy.group(PLASMA_CELLS)
    if not group:
        return None
    count = sum(row.count for row in found.classes if row.name in group)
    low, high = wilson_interval(count, found.classified)
    return BurdenRecord(
        group=PLASMA_CELLS,
        label="Plasma cells",
        count=count,
        classified=found.classified,
        percent=_percent(count, found.classified),
        low=100 * low if found.classified else 0.0,
        high=100 * high if found.classified else 0.0,
        minimum=100 * bundle.qc.min_plasma_cell_fraction,
        rule=bundle.qc.plasma_cell_rule,
    )


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else 0.0
