"""Gated-attention MIL (METHOD.md A): independent sigmoid tasks, one threshold each,
and a high-risk call over the tasks the bundle names (any positive: positive)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.head_kinds.base import (
    CaseHeadKind,
    Finding,
    Interpretation,
    check_subset,
    clipped,
    combine_calls,
    predict,
)
from runtime.typed_json import SpecError

if TYPE_CHECKING:
    from runtime.bundle_format import HeadSpec


@dataclass(frozen=True)
class GatedMilParams:
    """The kind's own keys: its tasks in output order, and which of them mean high risk."""

    tasks: tuple[str, ...]
    high_risk: tuple[str, ...] = ()


class GatedAttentionMil(CaseHeadKind):
    name = "gated_attention_mil"
    params_type = GatedMilParams

    def outputs(self, spec: HeadSpec) -> tuple[str, ...]:
        return tuple(self.params(spec).tasks)

    def check(self, spec: HeadSpec, params: GatedMilParams, where: str) -> None:
        if set(spec.thresholds) != set(params.tasks):
            raise SpecError(f"{where}.thresholds must give exactly one threshold per task")
        check_subset(params.high_risk, params.tasks, f"{where}.high_risk", "tasks")
        kind = spec.calibration.get("kind", "none")
        if kind == "none":
            return
        if kind != "platt":
            raise SpecError(f"{where}.calibration.kind {kind!r}: a {self.name} head uses platt")
        for part in ("a", "b"):
            values = spec.calibration.get(part)
            if not isinstance(values, dict) or set(values) != set(params.tasks):
                raise SpecError(f"{where}.calibration.{part} must map every task to a number")

    def calibrate(self, spec: HeadSpec, probabilities: np.ndarray) -> np.ndarray:
        calibration = spec.calibration
        if calibration.get("kind", "none") != "platt":
            return probabilities
        tasks = self.outputs(spec)
        a = np.array([calibration["a"][t] for t in tasks], dtype=np.float64)
        b = np.array([calibration["b"][t] for t in tasks], dtype=np.float64)
        p = clipped(probabilities)
        return 1.0 / (1.0 + np.exp(-(a * (np.log(p) - np.log1p(-p)) + b)))

    def interpret(
        self, spec: HeadSpec, probabilities: Mapping[str, float], extra: Mapping[str, np.ndarray]
    ) -> Interpretation:
        params: GatedMilParams = self.params(spec)
        predictions = tuple(predict(spec, task, probabilities[task]) for task in params.tasks)
        findings: tuple[Finding, ...] = ()
        if params.high_risk:
            calls = {p.task: p.call for p in predictions}
            names = " or ".join(spec.label(task) for task in params.high_risk)
            findings = (
                Finding(
                    key="high_risk",
                    label=f"High risk ({names})",
                    call=combine_calls([calls[task] for task in params.high_risk]),
                ),
            )
        return Interpretation(predictions, findings)
