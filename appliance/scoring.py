"""Case-level decisions on top of the heads' calls: attention mass and abstention.

The calls themselves (threshold, indeterminate band, high risk, malignancy,
top-2) come from ``runtime.heads``; this module decides whether the case gets
a call at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

INDETERMINATE = "indeterminate"  # runtime.heads gives the calls; this names the one we test
TOP_FRACTION = 0.2


def top_attention_mass(attention: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Share of the attention held by the top ``fraction`` of cells (paper: about 0.68)."""
    a = np.sort(np.asarray(attention, dtype=float))[::-1]
    if a.size == 0 or a.sum() <= 0:
        return 0.0
    k = max(1, int(np.ceil(fraction * a.size)))
    return float(a[:k].sum() / a.sum())


def abstain_reason(
    n_cells: int,
    min_cells: int,
    qc_failures: Sequence[str],
    n_slides: int,
    predictions: Sequence[Mapping[str, Any]],
) -> str | None:
    """Why the case gets no call, or None when it can be scored.

    ``qc_failures`` lists "<slide>: <reason>" for slides that failed QC; they
    contribute no cells. The case abstains when no slide passed QC, when too
    few cells remain, or when every task came out indeterminate.
    """
    if qc_failures and len(qc_failures) >= n_slides:
        return "slide QC failed: " + "; ".join(qc_failures)
    if n_cells < min_cells:
        return f"too few cells: {n_cells} (the bundle needs at least {min_cells})"
    if predictions and all(p["call"] == INDETERMINATE for p in predictions):
        return "all tasks indeterminate (every probability is within the band around its threshold)"
    return None
