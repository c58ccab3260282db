"""MIL heads: architecture, checkpoint format, ONNX export at bag lengths 1, 7 and 5,000."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_models import peaky_head
from typer.testing import CliRunner

from appliance.cli.main import app
from export.heads import (
    MYELOMA_TASKS,
    PB_CLASSES,
    HeadCheckpointError,
    TransformerMIL,
    build_head,
    load_heads,
    save_heads,
)
from export.onnx_export import (
    ParityError,
    export_head_member,
    head_parity,
    ort_session,
)
from runtime.parity import bag_features

DIM = 384


def mil(seed: int) -> torch.nn.Module:
    return peaky_head(build_head("gated_attention_mil", {"in_dim": DIM}), seed)


def transformer(seed: int, **config: object) -> torch.nn.Module:
    return peaky_head(build_head("transformer_mil", {"in_dim": DIM, **config}), seed)


def test_mil_head_outputs_four_task_probabilities_and_attention() -> None:
    model = mil(0)
    with torch.no_grad():
        probabilities, attention = model(torch.from_numpy(bag_features(50, DIM, seed=1)))
    assert model.config.tasks == MYELOMA_TASKS
    assert probabilities.shape == (4,) and bool(((probabilities > 0) & (probabilities < 1)).all())
    assert attention.shape == (50,)
    assert float(attention.sum()) == pytest.approx(1.0, abs=1e-6)


def test_transformer_defaults_follow_the_method_and_rollout_is_a_distribution() -> None:
    model = transformer(0)
    assert isinstance(model, TransformerMIL)
    assert len(model.blocks) == 10 and model.config.num_heads == 8
    assert model.blocks[0].qkv.bias is None and model.blocks[0].head_dim == 64
    assert model.config.classifier_hidden == 128 and model.config.classes == PB_CLASSES
    with torch.no_grad():
        probabilities, hemoglobin, attention = model(torch.from_numpy(bag_features(40, DIM, 2)))
    assert probabilities.shape == (8,) and float(probabilities.sum()) == pytest.approx(1.0)
    assert hemoglobin.shape == (1,)
    assert attention.shape == (40,) and float(attention.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(attention.min()) >= 0
    assert float(attention.max() / attention.min()) > 1.2  # not the trivial uniform rollout


def test_rollout_matches_the_full_matrix_product() -> None:
    """The row-vector rollout equals the CLS row of prod_l 0.5 * (mean_h A_l + I)."""
    model = transformer(1, depth=3)
    features = torch.from_numpy(bag_features(9, DIM, seed=3))
    maps = []
    with torch.no_grad():
        x = torch.cat([model.cls_token, model.embed(features)])
        for block in model.blocks:
            q, k, _ = block.query_key_value(x)
            maps.append(torch.softmax(q @ k.transpose(-2, -1), dim=-1).mean(0))
            x, _, _ = block(x)
        rollout = torch.eye(10)
        for attention in maps:
            rollout = (0.5 * attention + 0.5 * torch.eye(10)) @ rollout
        expected = rollout[0, 1:] / rollout[0, 1:].sum()
        _, _, got = model(features)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)


def test_checkpoint_round_trip_and_strict_errors(tmp_path: Path) -> None:
    members = [mil(s) for s in range(3)]
    path = tmp_path / "mm.pt"
    save_heads(members, path, thresholds={"del(17p)": 0.3})
    head_set = load_heads(path)
    assert head_set.kind == "gated_attention_mil" and len(head_set.members) == 3
    assert head_set.thresholds == {"del(17p)": 0.3}
    features = torch.from_numpy(bag_features(11, DIM, seed=4))
    for loaded, original in zip(head_set.members, members, strict=True):
        np.testing.assert_array_equal(loaded(features)[0].detach(), original(features)[0].detach())

    checkpoint = torch.load(path, weights_only=True)
    checkpoint["members"][1]["attention_w.w"] = checkpoint["members"][1].pop("attention_w.weight")
    torch.save(checkpoint, tmp_path / "renamed.pt")
    with pytest.raises(HeadCheckpointError, match=r"member 1 .*missing \['attention_w.weight'\]"):
        load_heads(tmp_path / "renamed.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(HeadCheckpointError, match="not a cytoedge-head checkpoint"):
        load_heads(tmp_path / "foreign.pt")


def test_mil_head_exports_and_agrees_at_1_7_and_5000_cells(tmp_path: Path) -> None:
    model = mil(7)
    report = export_head_member(model, tmp_path / "mm.0.onnx", bag_lengths=(1, 7, 5000))
    print(report.summary())
    assert report.passed and report.metrics["max_probability_diff"] <= 1e-4
    session = ort_session(tmp_path / "mm.0.onnx")
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "attention"]
    probabilities, attention = session.run(None, {"features": bag_features(5000, DIM, seed=6)})
    assert probabilities.shape == (4,) and attention.shape == (5000,)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "mm.0.onnx")).metadata_props}
    assert json.loads(meta["cytoedge.head_config"])["tasks"] == list(MYELOMA_TASKS)
    assert min(o.opset_import[0].version for o in [onnx.load(str(tmp_path / "mm.0.onnx"))]) >= 17


def test_transformer_exports_and_agrees_at_1_and_7_cells(tmp_path: Path) -> None:
    model = transformer(8)  # full depth 10
    report = export_head_member(model, tmp_path / "pb.0.onnx", bag_lengths=(1, 7))
    print(report.summary())
    assert report.passed
    session = ort_session(tmp_path / "pb.0.onnx")
    assert [o.name for o in session.get_outputs()] == ["probabilities", "hemoglobin", "attention"]


@pytest.mark.slow
def test_transformer_agrees_at_5000_cells(tmp_path: Path) -> None:
    # depth 1 keeps this affordable on a shared 2-core CPU: attention is (8, 5001, 5001)
    # per layer, and the same graph (dynamic cells axis) serves every depth.
    model = transformer(9, depth=1)
    report = export_head_member(model, tmp_path / "pb.0.onnx", bag_lengths=(5000,))
    print(report.summary())
    assert report.passed


def test_perturbed_head_fails_its_gate_with_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mil(10)
    export_head_member(model, tmp_path / "ok.onnx", bag_lengths=(7,))
    with torch.no_grad():
        model.classifiers.weight[2].mul_(1.05)  # one task's weights changed after export
    report = head_parity([model], [tmp_path / "ok.onnx"], (7, 300))
    print(report.summary())
    assert not report.passed and report.metrics["max_probability_diff"] > 1e-4

    real_export = torch.onnx.export

    def export_perturbed(member: torch.nn.Module, *args: object, **kwargs: object) -> None:
        with torch.no_grad():
            member.attention_w.weight.mul_(1.5)
            try:
                real_export(member, *args, **kwargs)
            finally:
                member.attention_w.weight.div_(1.5)

    monkeypatch.setattr(torch.onnx, "export", export_perturbed)
    with pytest.raises(ParityError) as caught:
        export_head_member(mil(11), tmp_path / "bad.onnx", bag_lengths=(7, 300))
    assert caught.value.report.metrics["min_attention_cosine"] < 0.99999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]


def test_cli_exports_an_ensemble_with_its_bundle_section(tmp_path: Path) -> None:
    save_heads([mil(20), mil(21)], tmp_path / "mm.pt", thresholds=dict.fromkeys(MYELOMA_TASKS, 0.4))
    out = tmp_path / "out"
    heads_args = ["export", "heads", "--checkpoint", str(tmp_path / "mm.pt"), "--out", str(out)]
    result = CliRunner().invoke(
        app,
        [
            *heads_args,
            "--name",
            "mm-risk",
            "--kind",
            "gated_attention_mil",
            "--bag-lengths",
            "1,7,500",
        ],
    )
    print(result.output)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "export.json").read_text())
    section = document["section"]
    assert section["files"] == ["mm-risk.0.onnx", "mm-risk.1.onnx"]
    assert section["high_risk"] == ["del(17p)", "t(4;14)"]
    assert section["thresholds"] == dict.fromkeys(MYELOMA_TASKS, 0.4)
    assert all(document["parity"][f]["passed"] for f in section["files"])

    wrong_kind = CliRunner().invoke(
        app,
        [*heads_args, "--name", "x", "--kind", "transformer_mil"],
    )
    assert wrong_kind.exit_code == 1 and "not transformer_mil" in wrong_kind.output
