"""DinoBloom encoder: strict loading of both real checkpoint formats, ONNX export, parity gate."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from export_models import meaningful_encoder, write_dinobloom_checkpoint, write_timm_cache
from typer.testing import CliRunner

from appliance.cli.main import app
from export.cell_images import cell_pixels
from export.crop_input import pixels_as_before, render_crops
from export.encoder import MEAN, STD, CheckpointError, load_encoder
from export.onnx_export import encoder_parity, export_encoder, ort_session
from export.targets import FP32
from runtime.parity import row_cosines

ENCODER_ARGS = ("export", "encoder", "--arch", "vit_small", "--checkpoint")


@pytest.fixture(scope="module")
def vit_s() -> torch.nn.Module:
    return meaningful_encoder("vit_small", seed=3)


@pytest.fixture(scope="module")
def official_checkpoint(vit_s: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dinobloom_checkpoint(vit_s, tmp_path_factory.mktemp("w") / "DinoBloom-S.pth")


@pytest.fixture(scope="module")
def exported(
    official_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """The CLI's own export of the official checkpoint (one ViT-S export for the module)."""
    out = tmp_path_factory.mktemp("encoder")
    result = CliRunner().invoke(
        app,
        [*ENCODER_ARGS, str(official_checkpoint), "--format", "dinobloom", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def embed(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).numpy()


def test_official_checkpoint_loads_strictly_into_the_same_model(
    vit_s: torch.nn.Module, official_checkpoint: Path
) -> None:
    loaded = load_encoder(official_checkpoint, "vit_small", "dinobloom")
    pixels = cell_pixels(2, seed=1)
    np.testing.assert_array_equal(embed(loaded, pixels), embed(vit_s, pixels))


def test_timm_hub_cache_folder_loads_strictly(vit_s: torch.nn.Module, tmp_path: Path) -> None:
    repo = write_timm_cache(vit_s, tmp_path, "vit_small")
    pixels = cell_pixels(2, seed=2)
    for path in (repo, next((repo / "snapshots").iterdir())):
        loaded = load_encoder(path, "vit_small", "timm-cache")
        np.testing.assert_array_equal(embed(loaded, pixels), embed(vit_s, pixels))


def test_renamed_key_fails_with_one_clear_error(vit_s: torch.nn.Module, tmp_path: Path) -> None:
    path = write_dinobloom_checkpoint(
        vit_s,
        tmp_path / "renamed.pth",
        rename=("backbone.blocks.3.attn.qkv.weight", "backbone.blocks.3.attn.qkv_w.weight"),
    )
    with pytest.raises(CheckpointError) as caught:
        load_encoder(path, "vit_small", "dinobloom")
    assert caught.value.missing == ["blocks.3.attn.qkv.weight"]
    assert caught.value.unexpected == ["blocks.3.attn.qkv_w.weight"]
    assert "missing keys (1): blocks.3.attn.qkv.weight" in str(caught.value)


def test_missing_keys_fail_in_both_formats(vit_s: torch.nn.Module, tmp_path: Path) -> None:
    official = write_dinobloom_checkpoint(
        vit_s, tmp_path / "missing.pth", drop="backbone.blocks.11.ls2.gamma"
    )
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.11.ls2.gamma"):
        load_encoder(official, "vit_small", "dinobloom")
    repo = write_timm_cache(vit_s, tmp_path / "hub", "vit_small", drop="norm.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): norm.weight"):
        load_encoder(repo, "vit_small", "timm-cache")


def test_wrong_architecture_and_foreign_files_are_refused(
    official_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="shape"):
        load_encoder(official_checkpoint, "vit_base", "dinobloom")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="expected a dict with a 'teacher'"):
        load_encoder(tmp_path / "other.pth", "vit_small", "dinobloom")
    with pytest.raises(CheckpointError, match="not a model-hub cache folder"):
        load_encoder(tmp_path, "vit_small", "timm-cache")


def test_a_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    # any object outside the weights-only allow-list (here a Path) is refused, not built
    torch.save({"teacher": {"backbone.x": torch.zeros(1)}, "hook": pathlib.PurePath("x")},
               tmp_path / "code.pth")  # fmt: skip
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_encoder(tmp_path / "code.pth", "vit_small", "dinobloom")


def test_other_position_grids_are_refused_not_resampled(
    vit_s: torch.nn.Module, tmp_path: Path
) -> None:
    checkpoint = {"teacher": {f"backbone.{k}": v for k, v in vit_s.state_dict().items()}}
    checkpoint["teacher"]["backbone.pos_embed"] = torch.zeros(1, 1370, 384)  # 518 px grid
    torch.save(checkpoint, tmp_path / "518.pth")
    with pytest.raises(CheckpointError, match=r"expected \(1, 257, D\)"):
        load_encoder(tmp_path / "518.pth", "vit_small", "dinobloom")


def test_embedding_is_the_cls_token_after_the_final_norm(vit_s: torch.nn.Module) -> None:
    seen = {}
    hook = vit_s.norm.register_forward_hook(lambda _m, _i, out: seen.update(tokens=out))
    try:
        embedding = embed(vit_s, cell_pixels(2, seed=4))
    finally:
        hook.remove()
    assert seen["tokens"].shape == (2, 257, 384)
    np.testing.assert_array_equal(embedding, seen["tokens"][:, 0].numpy())


def test_cli_export_passes_the_gate_with_dynamic_batch(exported: tuple[Path, str]) -> None:
    out, output = exported
    print(output)  # the gate's numbers, kept in the test log
    assert "parity passed" in output
    session = ort_session(out / "encoder.onnx")
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    for batch in (1, 3):
        (embedding,) = session.run(None, {"pixels": cell_pixels(batch, seed=9)})
        assert embedding.shape == (batch, 384)
    document = (out / "export.json").read_text()
    assert '"passed": true' in document and '"vit_small_patch14_dinov2"' in document
    limits = json.loads(document)["parity"]["encoder.onnx"]["limits"]
    assert limits == {"min_cosine": f">= {FP32.min_cosine}"}  # the table's limit, applied


def test_gate_fails_loudly_on_a_perturbed_model(
    vit_s: torch.nn.Module, exported: tuple[Path, str]
) -> None:
    out, _ = exported
    perturbed = meaningful_encoder("vit_small", seed=3)
    with torch.no_grad():  # one weight matrix deep in the network, changed after export
        perturbed.blocks[8].mlp.fc2.weight.mul_(1.1)
    batches = [cell_pixels(2, seed=5)]
    assert encoder_parity(vit_s, out / "encoder.onnx", batches).passed
    report = encoder_parity(perturbed, out / "encoder.onnx", batches)
    print(report.summary())
    assert not report.passed
    assert report.metrics["min_cosine"] < 0.99999


def test_failed_gate_writes_no_file_and_the_cli_exits_non_zero(
    official_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = torch.onnx.export

    def export_a_corrupted_graph(model: torch.nn.Module, *args: object, **kwargs: object) -> None:
        with torch.no_grad():
            original = model.blocks[5].attn.proj.weight.clone()
            model.blocks[5].attn.proj.weight.mul_(1.2)
            try:
                real_export(model, *args, **kwargs)
            finally:
                model.blocks[5].attn.proj.weight.copy_(original)

    monkeypatch.setattr(torch.onnx, "export", export_a_corrupted_graph)
    result = CliRunner().invoke(
        app,
        [*ENCODER_ARGS, str(official_checkpoint), "--out", str(tmp_path / "out")],
    )
    print(result.output)
    assert result.exit_code == 1
    assert "parity FAILED" in result.output and "min_cosine=" in result.output
    assert list((tmp_path / "out").iterdir()) == []  # no ONNX, no export.json, no leftovers


@pytest.mark.slow
def test_vit_b_official_checkpoint_exports_and_passes(tmp_path: Path) -> None:
    model = meaningful_encoder("vit_base", seed=5)
    path = write_dinobloom_checkpoint(model, tmp_path / "DinoBloom-B.pth")
    loaded = load_encoder(path, "vit_base", "dinobloom")
    report = export_encoder(loaded, tmp_path / "encoder.onnx", batches=[cell_pixels(2, seed=8)])
    print(report.summary())
    assert report.passed and report.metrics["min_cosine"] >= 0.99999


@pytest.mark.slow
def test_cli_folds_the_preprocessing_into_every_variant(
    official_checkpoint: Path, exported: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "crops"
    arguments = [*ENCODER_ARGS, str(official_checkpoint), "--out", str(out)]
    result = CliRunner().invoke(app, [*arguments, "--int8", "--crop-px", "128"])
    assert result.exit_code == 0, result.output
    print(result.output)  # the gates' numbers, kept in the test log
    document = json.loads((out / "export.json").read_text())
    assert document["section"]["input"]["crop_px"] == 128
    assert set(document["section"]["variants"]) == {"fp32", "int8"}
    for name in ("encoder.onnx", "encoder.int8.onnx"):
        assert document["parity"][name]["crop_input"]["passed"] is True
        [network_input] = ort_session(out / name).get_inputs()
        assert network_input.name == "crops" and network_input.type == "tensor(uint8)"
        assert network_input.shape[1:] == [128, 128, 3]
    crops = render_crops(4, 128, seed=8)
    (folded,) = ort_session(out / "encoder.onnx").run(["embedding"], {"crops": crops})
    plain_out, _ = exported
    pixels = pixels_as_before(crops, 224, MEAN, STD)
    (plain,) = ort_session(plain_out / "encoder.onnx").run(["embedding"], {"pixels": pixels})
    assert row_cosines(plain, folded).min() > 0.9999, "the same network, fed the same cells"
