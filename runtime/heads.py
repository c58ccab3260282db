"""MIL heads on a bag of cell embeddings: ensemble-averaged probabilities, calls, attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, open_model
from runtime.bundle import MALIGNANCY, Bundle, HeadSpec

POSITIVE, NEGATIVE, INDETERMINATE = "positive", "negative", "indeterminate"


class BagError(ValueError):
    """A bag the heads cannot take (empty, wrong width, too large); one line."""


@dataclass(frozen=True)
class Prediction:
    task: str
    label: str
    probability: float
    threshold: float
    call: str


@dataclass(frozen=True)
class HeadResult:
    head: str
    kind: str
    probabilities: dict[str, float]  # per task (MIL) or class (transformer), calibrated
    attention: np.ndarray  # (N,) per cell, averaged over the ensemble
    predictions: tuple[Prediction, ...]
    member_probabilities: np.ndarray  # (members, outputs), before calibration
    high_risk: str | None = None  # call on the high-risk tasks; None without any
    malignancy_probability: float | None = None
    top2: tuple[tuple[str, float], ...] = ()
    hemoglobin: float | None = None


def call(probability: float, threshold: float, band: float) -> str:
    """positive at or above threshold + band, negative below threshold - band."""
    if probability >= threshold + band:
        return POSITIVE
    if probability < threshold - band:
        return NEGATIVE
    return INDETERMINATE


def combine_calls(calls: list[str]) -> str:
    """Any positive makes the combination positive; all negative makes it negative."""
    if POSITIVE in calls:
        return POSITIVE
    return NEGATIVE if all(c == NEGATIVE for c in calls) else INDETERMINATE


class HeadRunner:
    """One head of a bundle: every ensemble member loaded, run, and averaged."""

    def __init__(
        self,
        bundle: Bundle,
        name: str,
        backend: str = "auto",
        threads: int = 0,
        *,
        build_engines: bool = True,
    ) -> None:
        self.spec: HeadSpec = bundle.head(name)
        self.embed_dim = bundle.encoder.embed_dim
        self.members: list[Backend] = [
            open_model(
                bundle.file(relative),
                backend,
                threads,
                engine_dir=bundle.engines_dir,
                build_engines=build_engines,
            )
            for relative in self.spec.files
        ]
        for member in self.members:
            self._check_member(member)

    def _check_member(self, member: Backend) -> None:
        inputs = {spec.name: spec for spec in member.inputs}
        outputs = {spec.name for spec in member.outputs}
        needed = {"probabilities", "attention"}
        if self.spec.kind == "transformer_mil":
            needed.add("hemoglobin")
        if set(inputs) != {"features"} or not needed <= outputs:
            raise BackendError(
                f"{member.path.name}: a {self.spec.kind} head needs input features and outputs "
                f"{sorted(needed)}; it has {sorted(inputs)} -> {sorted(outputs)}"
            )
        width = inputs["features"].shape[-1]
        if isinstance(width, int) and width != self.embed_dim:
            raise BackendError(
                f"{member.path.name}: takes {width}-d features, the encoder gives {self.embed_dim}"
            )

    @property
    def backend_name(self) -> str:
        return self.members[0].name

    def predict(self, features: np.ndarray) -> HeadResult:
        """Run every member on the bag (N, D) and average their outputs."""
        if features.ndim != 2 or features.shape[1] != self.embed_dim:
            raise BagError(f"a bag must be (N, {self.embed_dim}), got shape {features.shape}")
        cells = features.shape[0]
        if cells == 0:
            raise BagError("the bag is empty: no cells to score")
        limits = [m.max_batch for m in self.members if m.max_batch is not None]
        if limits and cells > min(limits):
            raise BagError(f"the bag has {cells} cells; this backend takes at most {min(limits)}")
        bag = np.ascontiguousarray(features, dtype=np.float32)
        runs = [member.run({"features": bag}) for member in self.members]
        outputs = self.spec.outputs
        probabilities = np.stack(
            [np.asarray(r["probabilities"], np.float64).reshape(-1) for r in runs]
        )
        if probabilities.shape[1] != len(outputs):
            raise BackendError(
                f"head {self.spec.name}: {probabilities.shape[1]} probabilities, "
                f"bundle.json lists {len(outputs)}"
            )
        attention = np.mean([np.asarray(r["attention"], np.float64).reshape(-1) for r in runs], 0)
        if attention.shape != (cells,):
            raise BackendError(f"head {self.spec.name}: attention {attention.shape}, {cells} cells")
        averaged = self._calibrate(probabilities.mean(axis=0))
        by_name = {name: float(p) for name, p in zip(outputs, averaged, strict=True)}
        common = {
            "head": self.spec.name,
            "kind": self.spec.kind,
            "probabilities": by_name,
            "attention": attention.astype(np.float32),
            "member_probabilities": probabilities.astype(np.float32),
        }
        if self.spec.kind == "gated_attention_mil":
            return self._mil_result(by_name, common)
        hemoglobin = float(np.mean([np.asarray(r["hemoglobin"]).reshape(-1)[0] for r in runs]))
        return self._transformer_result(by_name, hemoglobin, common)

    def _calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        calibration = self.spec.calibration
        kind = calibration.get("kind", "none")
        clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
        if kind == "platt":
            a = np.array([calibration["a"][t] for t in self.spec.tasks], dtype=np.float64)
            b = np.array([calibration["b"][t] for t in self.spec.tasks], dtype=np.float64)
            logits = np.log(clipped) - np.log1p(-clipped)
            return 1.0 / (1.0 + np.exp(-(a * logits + b)))
        if kind == "temperature":
            # log p differs from the logits by a constant, which softmax ignores.
            scaled = np.log(clipped) / float(calibration["temperature"])
            scaled = np.exp(scaled - scaled.max())
            return scaled / scaled.sum()
        return probabilities

    def _mil_result(self, probabilities: dict[str, float], common: dict[str, Any]) -> HeadResult:
        band = self.spec.indeterminate_band
        predictions = tuple(
            Prediction(
                task,
                self.spec.label(task),
                probabilities[task],
                self.spec.thresholds[task],
                call(probabilities[task], self.spec.thresholds[task], band),
            )
            for task in self.spec.tasks
        )
        calls = {p.task: p.call for p in predictions}
        high_risk = (
            combine_calls([calls[t] for t in self.spec.high_risk]) if self.spec.high_risk else None
        )
        return HeadResult(predictions=predictions, high_risk=high_risk, **common)

    def _transformer_result(
        self, probabilities: dict[str, float], hemoglobin: float, common: dict[str, Any]
    ) -> HeadResult:
        ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)
        malignancy = None
        predictions: tuple[Prediction, ...] = ()
        if self.spec.malignant_classes:
            malignancy = float(sum(probabilities[c] for c in self.spec.malignant_classes))
            threshold = self.spec.thresholds[MALIGNANCY]
            predictions = (
                Prediction(
                    MALIGNANCY,
                    self.spec.label(MALIGNANCY),
                    malignancy,
                    threshold,
                    call(malignancy, threshold, self.spec.indeterminate_band),
                ),
            )
        return HeadResult(
            predictions=predictions,
            malignancy_probability=malignancy,
            top2=tuple(ranked[:2]),
            hemoglobin=hemoglobin,
            **common,
        )

    def close(self) -> None:
        for member in self.members:
            member.close()


def load_heads(
    bundle: Bundle, backend: str = "auto", threads: int = 0, *, build_engines: bool = True
) -> dict[str, HeadRunner]:
    """Every head of the bundle, by name."""
    return {
        head.name: HeadRunner(bundle, head.name, backend, threads, build_engines=build_engines)
        for head in bundle.heads
    }
