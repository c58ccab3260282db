"""The encoder's table of export targets: limits, and the command making exactly what is asked."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import export.encoder
from appliance.cli.main import app
from export import cli, targets
from export.targets import ENCODER_TARGETS, EncoderExport, ExportTarget
from runtime.parity import (
    ENCODER_MIN_COSINE,
    ENCODER_MIN_COSINE_BY_VARIANT,
    FP16_MIN_COSINE,
    INT8_MIN_COSINE,
)


def test_every_gate_limit_is_the_runtime_limit_of_its_precision() -> None:
    limits = {target.name: target.min_cosine for target in ENCODER_TARGETS}
    assert limits == {
        "fp32 ONNX": ENCODER_MIN_COSINE,
        "fp16 ONNX": FP16_MIN_COSINE,
        "int8 ONNX": INT8_MIN_COSINE,
        "static int8 ONNX (NNCF)": INT8_MIN_COSINE,
        "crop-input fold": None,  # each folded variant keeps its own limit
        "TensorRT plan": FP16_MIN_COSINE,
    }
    for target in ENCODER_TARGETS:
        if target.precision is not None:
            assert target.min_cosine == ENCODER_MIN_COSINE_BY_VARIANT[target.precision]
        if target.variant:
            assert target.variant == target.precision and target.file.endswith(".onnx")


def test_every_row_the_encoder_command_builds_has_its_option_and_function() -> None:
    options = inspect.signature(cli.encoder).parameters
    for target in ENCODER_TARGETS:
        if target.built_by == targets.ENCODER_COMMAND:
            assert target.build is not None, target.name
            assert target.option is None or target.option in options, target.name
        else:  # built on the site's GPU
            assert target.build is None and target.built_by == targets.ENGINES_COMMAND


@pytest.mark.parametrize(
    ("flags", "made"),
    [
        ([], ["fp32 ONNX"]),
        (["--fp16"], ["fp32 ONNX", "fp16 ONNX"]),
        (["--int8"], ["fp32 ONNX", "int8 ONNX"]),
        (["--int8-static"], ["fp32 ONNX", "static int8 ONNX (NNCF)"]),
        (["--crop-px", "128"], ["fp32 ONNX", "crop-input fold"]),
        (
            ["--fp16", "--int8", "--int8-static", "--crop-px", "128"],
            ["fp32 ONNX", "fp16 ONNX", "int8 ONNX", "static int8 ONNX (NNCF)", "crop-input fold"],
        ),
    ],
)
def test_the_encoder_command_makes_exactly_the_targets_asked_for(
    flags: list[str], made: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []

    def build(job: EncoderExport, target: ExportTarget) -> None:  # stands in for the real one
        ran.append(target.name)
        if target.variant:
            (job.out / target.file).write_bytes(b"onnx")
            job.variants[target.variant] = target.file
            job.parity[target.file] = {"passed": True}

    stand_ins = tuple(
        dataclasses.replace(t, build=build) if t.build is not None else t for t in ENCODER_TARGETS
    )
    monkeypatch.setattr(targets, "ENCODER_TARGETS", stand_ins)
    monkeypatch.setattr(export.encoder, "load_encoder", lambda *args: object())
    checkpoint = tmp_path / "DinoBloom-S.pth"
    checkpoint.write_bytes(b"weights")
    out = tmp_path / "out"
    arguments = ["--arch", "vit_small", "--checkpoint", str(checkpoint), "--out", str(out)]
    result = CliRunner().invoke(app, ["export", "encoder", *arguments, *flags])
    assert result.exit_code == 0, result.output
    assert ran == made
    document = json.loads((out / "export.json").read_text())
    variants = {t.variant: t.file for t in ENCODER_TARGETS if t.name in made and t.variant}
    assert document["section"]["variants"] == variants
    assert set(document["parity"]) == set(variants.values())
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(variants.values())
    assert document["section"]["input"]["crop_px"] == (128 if "--crop-px" in flags else 0)
