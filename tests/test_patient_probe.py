"""The patient-linear recipe's network and objective on patient embeddings whose marker
status lies along one direction (as GenBloom-G's genetic alignment puts it): the probe
learns it out of fold, exports behind its parity gate as one (1, E) input with no
attention, and the head's kind refuses what it cannot read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from appliance.validation import metrics
from export.cross_validate import cross_validate
from export.onnx_export import export_heads, ort_session
from export.train_patient import PatientProbeObjective, PatientProbeRecipe
from runtime.head_kinds import Truth
from runtime.typed_json import SpecError

TASKS = ("del(17p)", "t(4;14)")
SHA = "ab" * 32


def _patients(n: int, dim: int, seed: int) -> tuple[list[np.ndarray], list[Truth]]:
    """Unit-length embeddings: positives for each task lean along that task's direction."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(TASKS), dim))
    labels = rng.random((n, len(TASKS))) < 0.4
    vectors = rng.normal(size=(n, dim)) + 1.5 * (labels * 2.0 - 1.0) @ directions / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    truths = [Truth({t: bool(v) for t, v in zip(TASKS, row, strict=True)}) for row in labels]
    return [v[None].astype(np.float32) for v in vectors], truths


@pytest.mark.parametrize("hidden", [0, 16])
def test_a_probe_learns_the_markers_out_of_fold_and_exports_behind_its_gate(
    hidden: int, tmp_path: Path
) -> None:
    bags, truths = _patients(60, 24, seed=3)
    objective = PatientProbeObjective(SHA, PatientProbeRecipe(hidden_dim=hidden), tasks=TASKS)
    targets = objective.targets(truths)
    validation = cross_validate(objective, bags, targets, k=3, seed=0)
    for t in range(len(TASKS)):
        assert metrics.auc(validation.raw[:, t], targets["tasks"][:, t]) > 0.8
    spec = objective.head_spec("myeloma", ["-"], validation.raw, {}, targets, 0.05)
    assert spec.kind == "patient_probe" and spec.extra["patient_encoder_sha256"] == SHA
    assert spec.calibration["kind"] == "platt" and set(spec.thresholds) == set(TASKS)
    spec.validate("heads[myeloma]")

    paths, reports = export_heads(validation.members, tmp_path, "myeloma")
    assert len(paths) == 3 and all(r.passed for r in reports)
    assert "min_attention_cosine" not in reports[0].metrics
    session = ort_session(paths[0])
    (features,) = session.get_inputs()
    assert features.name == "features" and list(features.shape) == [1, 24]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    (probabilities,) = session.run(None, {"features": bags[0]})
    assert probabilities.shape == (len(TASKS),)


def test_the_probe_kind_needs_its_patient_encoder_and_reads_no_cell_classes() -> None:
    objective = PatientProbeObjective(SHA, tasks=TASKS)
    spec = objective.provisional_spec("myeloma")
    untied = spec.__class__(**{**spec.__dict__, "extra": {"tasks": list(TASKS)}})
    with pytest.raises(SpecError, match="patient_encoder_sha256"):
        untied.validate("heads[myeloma]")
    classes = spec.__class__(**{**spec.__dict__, "bag_classes": ("plasma_cell",)})
    with pytest.raises(SpecError, match="reads the patient embedding"):
        classes.validate("heads[myeloma]")
