"""A third kind of head, whole in this one file: a single score called against a cut-off,
and a finding that says how far the score is from it. Importing the module registers it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.head_kinds import CaseHeadKind, Finding, Interpretation
from runtime.head_kinds.base import predict
from runtime.typed_json import SpecError

if TYPE_CHECKING:
    from runtime.bundle_format import HeadSpec


@dataclass(frozen=True)
class ScoreParams:
    score: str  # the one output's name
    margin_label: str = "Distance from the cut-off"


class CutOffScore(CaseHeadKind):
    name = "toy_cut_off_score"
    params_type = ScoreParams

    def outputs(self, spec: HeadSpec) -> tuple[str, ...]:
        return (self.params(spec).score,)

    def check(self, spec: HeadSpec, params: ScoreParams, where: str) -> None:
        if set(spec.thresholds) != {params.score}:
            raise SpecError(f"{where}.thresholds must hold the cut-off of {params.score!r}")

    def calibrate(self, spec: HeadSpec, probabilities: np.ndarray) -> np.ndarray:
        return probabilities

    def interpret(
        self, spec: HeadSpec, probabilities: Mapping[str, float], extra: Mapping[str, np.ndarray]
    ) -> Interpretation:
        params: ScoreParams = self.params(spec)
        score = probabilities[params.score]
        margin = score - spec.thresholds[params.score]
        finding = Finding(
            key="margin", label=params.margin_label, value=margin, text=f"{margin:+.3f}"
        )
        return Interpretation((predict(spec, params.score, score),), (finding,))
