"""Heads on cell embeddings: a case head's bag, and the cell head's every cell.

``HeadRunner`` loads every ensemble member of one case head, checks that each has
the outputs its kind needs, runs them on a bag, averages them and hands the mean to
the head's kind (``runtime.head_kinds``), which calibrates and calls it.
``CellHeadRunner`` does the same for the bundle's cell head, row by row: the mean
of its members' class probabilities per cell (``probabilities``, what the slide
cache keeps), and each cell's call from it (``classify``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from runtime.backends import Backend, BackendError, RuntimeSettings, open_model
from runtime.bundle_format import Bundle, HeadSpec
from runtime.head_kinds import CellCalls, CellHeadKind, Finding, Prediction
from runtime.head_kinds.base import BASE_OUTPUTS

CELL_BATCH = 4096  # cells per call of the cell head: its work per cell is a few matmuls


class BagError(ValueError):
    """A bag the heads cannot take (empty, wrong width, too large); one line."""


@dataclass(frozen=True)
class HeadResult:
    head: str
    kind: str
    probabilities: dict[str, float]  # per output of the head, calibrated
    attention: np.ndarray  # (N,) per cell, averaged over the ensemble; (0,): none
    predictions: tuple[Prediction, ...]
    findings: tuple[Finding, ...]
    member_probabilities: np.ndarray  # (members, outputs), before calibration


class HeadRunner:
    """One head of a bundle: every ensemble member loaded, run, and averaged."""

    def __init__(self, bundle: Bundle, name: str, settings: RuntimeSettings | None = None) -> None:
        self.spec: HeadSpec = bundle.head(name)
        self.kind = self.spec.head_kind
        self.reads_patient = self.kind.reads == "patient"
        if self.reads_patient and bundle.patient_encoder is None:
            raise BackendError(f"head {name} reads the patient embedding; the bundle has none")
        # a bag of cell embeddings, or the one patient embedding (1, E)
        patient = bundle.patient_encoder
        self.embed_dim = (
            patient.embed_dim if patient and self.reads_patient else bundle.encoder.embed_dim
        )
        self.members: list[Backend] = [
            open_model(bundle.file(relative), settings, engine_dir=bundle.engines_dir)
            for relative in self.spec.files
        ]
        for member in self.members:
            self._check_member(member)

    def _check_member(self, member: Backend) -> None:
        inputs = {spec.name: spec for spec in member.inputs}
        outputs = {spec.name for spec in member.outputs}
        needed = self.kind.model_outputs
        if set(inputs) != {"features"} or not needed <= outputs:
            raise BackendError(
                f"{member.path.name}: a {self.spec.kind} head needs input features and outputs "
                f"{sorted(needed)}; it has {sorted(inputs)} -> {sorted(outputs)}"
            )
        width = inputs["features"].shape[-1]
        if isinstance(width, int) and width != self.embed_dim:
            source = "patient encoder" if self.reads_patient else "encoder"
            raise BackendError(
                f"{member.path.name}: takes {width}-d features, the {source} gives {self.embed_dim}"
            )

    @property
    def backend_name(self) -> str:
        return self.members[0].ran_on

    def predict(self, features: np.ndarray) -> HeadResult:
        """Run every member on the bag (N, D), or on the patient embedding (1, E) for a
        head that reads it; average their outputs, let the kind call them."""
        if features.ndim != 2 or features.shape[1] != self.embed_dim:
            raise BagError(f"a bag must be (N, {self.embed_dim}), got shape {features.shape}")
        cells = features.shape[0]
        if cells == 0:
            raise BagError("the bag is empty: no cells to score")
        if self.reads_patient and cells != 1:
            raise BagError(f"head {self.spec.name} takes one patient embedding, got {cells} rows")
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
        if "attention" in self.kind.model_outputs:
            attention = np.mean(
                [np.asarray(r["attention"], np.float64).reshape(-1) for r in runs], 0
            )
            if attention.shape != (cells,):
                raise BackendError(
                    f"head {self.spec.name}: attention {attention.shape}, {cells} cells"
                )
        else:  # a head on the patient embedding: no cell drove it more than another
            attention = np.zeros(0)
        calibrated = self.kind.calibrate(self.spec, probabilities.mean(axis=0))
        by_name = {name: float(p) for name, p in zip(outputs, calibrated, strict=True)}
        extra = {
            name: np.mean([np.asarray(r[name], np.float64) for r in runs], axis=0)
            for name in self.kind.model_outputs - BASE_OUTPUTS
        }
        interpretation = self.kind.interpret(self.spec, by_name, extra)
        return HeadResult(
            head=self.spec.name,
            kind=self.spec.kind,
            probabilities=by_name,
            attention=attention.astype(np.float32),
            predictions=interpretation.predictions,
            findings=interpretation.findings,
            member_probabilities=probabilities.astype(np.float32),
        )

    def close(self) -> None:
        for member in self.members:
            member.close()


def load_heads(
    bundle: Bundle,
    settings: RuntimeSettings | None = None,
    inputs: Collection[str] | None = None,
) -> dict[str, HeadRunner]:
    """Every head of the bundle by name; with ``inputs`` (the kinds of a case's slides,
    ``runtime.bundle_format.INPUT_KINDS``) only the heads that score such a case."""
    heads = bundle.heads if inputs is None else bundle.heads_for(inputs)
    return {head.name: HeadRunner(bundle, head.name, settings) for head in heads}


class CellHeadRunner:
    """The bundle's cell head: every ensemble member loaded, run on rows of cells."""

    def __init__(self, bundle: Bundle, settings: RuntimeSettings | None = None) -> None:
        if bundle.cell_head is None:
            raise ValueError(f"bundle {bundle.name} {bundle.version} has no cell head")
        self.spec: HeadSpec = bundle.cell_head
        kind = self.spec.head_kind
        if not isinstance(kind, CellHeadKind):
            raise ValueError(f"cell_head {self.spec.name}: {self.spec.kind} is not a cell head")
        self.kind = kind
        self.classes = self.spec.outputs
        self.embed_dim = bundle.encoder.embed_dim
        self.members: list[Backend] = [
            open_model(bundle.file(relative), settings, engine_dir=bundle.engines_dir)
            for relative in self.spec.files
        ]
        for member in self.members:
            inputs = {spec.name: spec for spec in member.inputs}
            if set(inputs) != {"features"} or "probabilities" not in {
                o.name for o in member.outputs
            }:
                raise BackendError(
                    f"{member.path.name}: a cell head needs input features and output probabilities"
                )

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, C) float32: the members' mean class probabilities, uncalibrated."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise BagError(f"cells must be (N, {self.embed_dim}), got {embeddings.shape}")
        out = np.zeros((len(embeddings), len(self.classes)), np.float32)
        limits = [m.max_batch for m in self.members if m.max_batch is not None]
        step = min([CELL_BATCH, *limits])
        for start in range(0, len(embeddings), step):
            rows = np.ascontiguousarray(embeddings[start : start + step], dtype=np.float32)
            runs = [m.run({"features": rows})["probabilities"] for m in self.members]
            mean = np.mean([np.asarray(r, np.float32) for r in runs], axis=0)
            if mean.shape != (len(rows), len(self.classes)):
                raise BackendError(
                    f"cell head {self.spec.name}: probabilities {mean.shape}, expected "
                    f"({len(rows)}, {len(self.classes)})"
                )
            out[start : start + len(rows)] = mean
        return out

    def classify(self, probabilities: np.ndarray) -> CellCalls:
        """Each cell's class, calibrated confidence and whether it is sure enough."""
        return self.kind.classify(self.spec, probabilities)

    @property
    def backend_name(self) -> str:
        return self.members[0].ran_on

    def close(self) -> None:
        for member in self.members:
            member.close()
