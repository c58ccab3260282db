"""The cell head (METHOD.md C, CytoDINO's lesson): every cell gets a class of the
bundle's taxonomy and a calibrated confidence, or is *unsure* below the operating
point, the confidence at which the out-of-fold accuracy reached the target (so that
a person sees the cells the head is not sure of)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.head_kinds.base import (
    CellCalls,
    CellHeadKind,
    check_temperature,
    temperature_scaled,
)
from runtime.taxonomy import Taxonomy
from runtime.typed_json import SpecError

if TYPE_CHECKING:
    from runtime.bundle_format import HeadSpec

CONFIDENCE = "confidence"  # the operating point's key in the head's thresholds


@dataclass(frozen=True)
class CellClassifierParams:
    """The kind's own keys: its taxonomy (the classes it was trained on, in output
    order), the accuracy its operating point was chosen for, and the share of cells
    that reached it out of fold."""

    taxonomy: Taxonomy
    target_accuracy: float = 0.99
    coverage: float | None = None


class CellClassifier(CellHeadKind):
    name = "cell_classifier"
    params_type = CellClassifierParams

    def outputs(self, spec: HeadSpec) -> tuple[str, ...]:
        return self.params(spec).taxonomy.names

    def labelled(self, spec: HeadSpec) -> set[str]:
        return set(self.outputs(spec))

    def check(self, spec: HeadSpec, params: CellClassifierParams, where: str) -> None:
        if set(spec.thresholds) != {CONFIDENCE}:
            raise SpecError(f"{where}.thresholds must hold the operating point {CONFIDENCE!r}")
        if not 0 < params.target_accuracy <= 1:
            raise SpecError(f"{where}.target_accuracy must lie in (0, 1]")
        check_temperature(spec, self.name, where)

    def calibrate(self, spec: HeadSpec, probabilities: np.ndarray) -> np.ndarray:
        return temperature_scaled(spec, probabilities)

    def classify(self, spec: HeadSpec, probabilities: np.ndarray) -> CellCalls:
        calibrated = self.calibrate(spec, np.asarray(probabilities, np.float64))
        classes = calibrated.argmax(axis=1)
        confidence = calibrated[np.arange(len(classes)), classes]
        return CellCalls(
            classes=classes.astype(np.int64),
            confidence=confidence.astype(np.float32),
            sure=confidence >= spec.thresholds[CONFIDENCE],
        )
