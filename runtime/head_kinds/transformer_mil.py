"""Transformer aggregator (METHOD.md B): softmax over classes, a hemoglobin regression,
and a malignancy call on the summed probability of the classes the bundle names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.head_kinds.base import (
    BASE_OUTPUTS,
    CaseHeadKind,
    Finding,
    Interpretation,
    Labels,
    Truth,
    check_subset,
    check_temperature,
    predict,
    temperature_scaled,
)
from runtime.labels import DIAGNOSIS, HEMOGLOBIN
from runtime.typed_json import SpecError

if TYPE_CHECKING:
    from runtime.bundle_format import HeadSpec

MALIGNANCY = "malignancy"  # the task (and threshold key) of the malignancy call
TOP = 2  # the paper reports top-2 accuracy besides top-1


@dataclass(frozen=True)
class TransformerMilParams:
    """The kind's own keys: its classes in output order, and which of them are malignant."""

    classes: tuple[str, ...]
    malignant_classes: tuple[str, ...] = ()


class TransformerMil(CaseHeadKind):
    name = "transformer_mil"
    params_type = TransformerMilParams
    model_outputs = BASE_OUTPUTS | {"hemoglobin"}

    def outputs(self, spec: HeadSpec) -> tuple[str, ...]:
        return tuple(self.params(spec).classes)

    def labelled(self, spec: HeadSpec) -> set[str]:
        return {*self.outputs(spec), MALIGNANCY}

    def check(self, spec: HeadSpec, params: TransformerMilParams, where: str) -> None:
        check_subset(
            params.malignant_classes, params.classes, f"{where}.malignant_classes", "classes"
        )
        if set(spec.thresholds) - {MALIGNANCY}:
            raise SpecError(f"{where}.thresholds may only hold {MALIGNANCY!r}")
        if params.malignant_classes and MALIGNANCY not in spec.thresholds:
            raise SpecError(f"{where}.thresholds.{MALIGNANCY} is needed with malignant_classes")
        check_temperature(spec, self.name, where)

    def calibrate(self, spec: HeadSpec, probabilities: np.ndarray) -> np.ndarray:
        return temperature_scaled(spec, probabilities)

    def truth(self, spec: HeadSpec, labels: Labels) -> Truth:
        """The case's diagnosis is its class; malignancy follows from the bundle's
        malignant classes; its hemoglobin is the regression's truth."""
        params: TransformerMilParams = self.params(spec)
        diagnosis = labels.get(DIAGNOSIS)
        label = diagnosis if isinstance(diagnosis, str) and diagnosis in params.classes else None
        tasks = {}
        if label is not None and params.malignant_classes:
            tasks[MALIGNANCY] = label in params.malignant_classes
        hemoglobin = labels.get(HEMOGLOBIN)
        values = {}
        if isinstance(hemoglobin, float | int) and not isinstance(hemoglobin, bool):
            values["hemoglobin"] = float(hemoglobin)
        return Truth(tasks, label, values)

    def interpret(
        self, spec: HeadSpec, probabilities: Mapping[str, float], extra: Mapping[str, np.ndarray]
    ) -> Interpretation:
        params: TransformerMilParams = self.params(spec)
        predictions = ()
        if params.malignant_classes:
            malignancy = float(sum(probabilities[c] for c in params.malignant_classes))
            predictions = (predict(spec, MALIGNANCY, malignancy),)
        ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)[:TOP]
        hemoglobin = float(np.asarray(extra["hemoglobin"]).reshape(-1)[0])
        findings = (
            Finding(
                key="top2",
                label="Most likely",
                text=", ".join(f"{spec.label(name)} {p:.2f}" for name, p in ranked),
            ),
            Finding(
                key="hemoglobin",
                label="Hemoglobin (regression)",
                value=hemoglobin,
                text=f"{hemoglobin:.1f} g/dL",
            ),
        )
        return Interpretation(predictions, findings)
