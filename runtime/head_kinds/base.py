"""What a kind of head is: its keys in ``bundle.json``, what its networks must output,
how its probabilities are calibrated and called, and what it adds to a result.

A kind is one class in one module of ``runtime.head_kinds`` (subclassing
``CaseHeadKind`` or ``CellHeadKind`` with a ``name`` registers it). Two families:
- a *case* head (``bundle.json``'s ``heads``) reads a case's bag of cells and gives
  ``Prediction`` rows with a threshold and a call and ``Finding`` rows with a call or
  a text; the runtime, the result, the report and the window only iterate over them;
- a *cell* head (``bundle.json``'s ``cell_head``) gives every cell a class and a
  confidence, or *unsure* below its operating point (``CellCalls``), from which the
  appliance builds the differential and the bags of the case heads that read only
  some classes.
None of the parts branches on a kind's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from runtime.plugins import Registered
from runtime.typed_json import SpecError, dump, parse_section

if TYPE_CHECKING:
    from runtime.bundle_format import HeadSpec

POSITIVE, NEGATIVE, INDETERMINATE = "positive", "negative", "indeterminate"
CALLS = (POSITIVE, NEGATIVE, INDETERMINATE)
# Every head network has these outputs; a kind may need more (``model_outputs``).
BASE_OUTPUTS = frozenset({"probabilities", "attention"})


@dataclass(frozen=True)
class Prediction:
    """A probability called against its threshold: one row with a bar."""

    task: str
    label: str
    probability: float
    threshold: float
    call: str


@dataclass(frozen=True)
class Finding:
    """A case-level statement of a head beyond its per-task calls: one row with a call
    (coloured like one) or a text, e.g. "High risk (del(17p) or t(4;14))": positive."""

    key: str  # stable name, for integrators: high_risk, top2, hemoglobin, ...
    label: str  # what the row says, built from the bundle (its tasks, labels, rules)
    call: str | None = None  # positive | negative | indeterminate
    value: float | None = None  # the number the row stands for, when there is one
    text: str = ""  # the row's words when it has no call


@dataclass(frozen=True)
class Interpretation:
    predictions: tuple[Prediction, ...]
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class Truth:
    """What a labelled case says about one head's outputs (training and validation)."""

    tasks: dict[str, bool]  # the truth of each prediction task the labels decide
    label: str | None = None  # the case's class, for a head whose outputs are exclusive classes
    values: dict[str, float] = field(default_factory=dict)  # per finding key with a value


# A labelled case's labels by name: a task's 0 / 1 as bool, a class as str, a value as float.
Labels = Mapping[str, bool | str | float]


def call(probability: float, threshold: float, band: float) -> str:
    """positive at or above threshold + band, negative below threshold - band."""
    if probability >= threshold + band:
        return POSITIVE
    if probability < threshold - band:
        return NEGATIVE
    return INDETERMINATE


def combine_calls(calls: Sequence[str]) -> str:
    """Any positive makes the combination positive; all negative makes it negative."""
    if POSITIVE in calls:
        return POSITIVE
    return NEGATIVE if all(c == NEGATIVE for c in calls) else INDETERMINATE


def predict(spec: HeadSpec, task: str, probability: float) -> Prediction:
    """``task``'s probability called against the head's threshold for it."""
    threshold = spec.thresholds[task]
    return Prediction(
        task,
        spec.label(task),
        float(probability),
        threshold,
        call(probability, threshold, spec.indeterminate_band),
    )


class HeadKind(Registered, ABC):
    """One kind of head. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # bundle.json's heads[].kind (or cell_head.kind)
    params_type: ClassVar[type]  # dataclass of the kind's own keys in the head object
    model_outputs: ClassVar[frozenset[str]] = BASE_OUTPUTS
    per_cell: ClassVar[bool] = False  # a cell head (CellHeadKind) rather than a case head
    reads: ClassVar[str] = "cells"  # what its network takes: cell embeddings, or "patient"
    registered: ClassVar[dict[str, type[HeadKind]]] = {}

    def params(self, spec: HeadSpec, where: str = "") -> Any:
        """The kind's own keys of ``spec`` as ``params_type`` (type-checked, strict)."""
        return parse_section(self.params_type, dump(spec.extra), where or f"heads[{spec.name}]")

    @abstractmethod
    def outputs(self, spec: HeadSpec) -> tuple[str, ...]:
        """Names of the network's ``probabilities``, in output order."""

    @abstractmethod
    def check(self, spec: HeadSpec, params: Any, where: str) -> None:
        """What types alone cannot say (thresholds per output, groups within the outputs)."""

    @abstractmethod
    def calibrate(self, spec: HeadSpec, probabilities: np.ndarray) -> np.ndarray:
        """The ensemble mean (in output order) as calibrated probabilities."""

    def labelled(self, spec: HeadSpec) -> set[str]:
        """Names ``labels`` may give display names to."""
        return set(self.outputs(spec))

    def validate(self, spec: HeadSpec, where: str) -> None:
        params = self.params(spec, where)
        outputs = self.outputs(spec)
        if not outputs:
            raise SpecError(f"{where}: a {self.name} head names at least one output")
        repeated = sorted({o for i, o in enumerate(outputs) if o in outputs[:i]})
        if repeated:
            raise SpecError(f"{where}: outputs {repeated} appear more than once")
        stray = sorted(set(spec.labels) - self.labelled(spec))
        if stray:
            raise SpecError(f"{where}.labels: {stray} are not outputs of this head")
        self.check(spec, params, where)


class CaseHeadKind(HeadKind):
    """A head that reads a case's bag of cell embeddings: (N, D) -> its probabilities
    (one per output) and an attention weight per cell; or, with ``reads = "patient"``,
    the case's patient embedding (1, E) -> its probabilities, with no attention."""

    @abstractmethod
    def interpret(
        self, spec: HeadSpec, probabilities: Mapping[str, float], extra: Mapping[str, np.ndarray]
    ) -> Interpretation:
        """Calls and findings from the calibrated probabilities and the members' mean of
        each further output the kind declares in ``model_outputs``."""

    def truth(self, spec: HeadSpec, labels: Labels) -> Truth:
        """The truth of each prediction task whose name is a label of the case (a
        kind whose tasks are derived, or which has classes or values, says more)."""
        tasks = {}
        for task in spec.thresholds:
            value = labels.get(task)
            if isinstance(value, bool):
                tasks[task] = value
        return Truth(tasks)


@dataclass(frozen=True)
class CellCalls:
    """Each cell's class and confidence (calibrated), and whether it is sure enough."""

    classes: np.ndarray  # (N,) int: index into the head's outputs (its classes)
    confidence: np.ndarray  # (N,) float: the calibrated probability of that class
    sure: np.ndarray  # (N,) bool: confidence at or above the head's operating point


class CellHeadKind(HeadKind):
    """A head that classifies each cell: (N, D) embeddings -> (N, C) probabilities."""

    model_outputs = frozenset({"probabilities"})
    per_cell = True

    @abstractmethod
    def classify(self, spec: HeadSpec, probabilities: np.ndarray) -> CellCalls:
        """Each cell's call from the ensemble mean (N, C) of its probabilities."""


def check_subset(values: Sequence[str], allowed: Sequence[str], where: str, what: str) -> None:
    stray = sorted(set(values) - set(allowed))
    if stray:
        raise SpecError(f"{where}: {stray} are not {what} of this head")


def clipped(probabilities: np.ndarray) -> np.ndarray:
    return np.clip(probabilities, 1e-7, 1 - 1e-7)


def check_temperature(spec: HeadSpec, kind: str, where: str) -> None:
    """``calibration`` is {} or {"kind": "temperature", "temperature": t > 0}."""
    calibration = spec.calibration.get("kind", "none")
    if calibration == "none":
        return
    if calibration != "temperature":
        raise SpecError(f"{where}.calibration.kind {calibration!r}: a {kind} head uses temperature")
    temperature = spec.calibration.get("temperature")
    if not isinstance(temperature, int | float) or temperature <= 0:
        raise SpecError(f"{where}.calibration.temperature must be a positive number")


def temperature_scaled(spec: HeadSpec, probabilities: np.ndarray) -> np.ndarray:
    """Softmax probabilities (..., C) at the head's temperature (unchanged without one)."""
    if spec.calibration.get("kind", "none") != "temperature":
        return probabilities
    # log p differs from the logits by a constant per row, which softmax ignores.
    scaled = np.log(clipped(probabilities)) / float(spec.calibration["temperature"])
    scaled = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return scaled / scaled.sum(axis=-1, keepdims=True)
