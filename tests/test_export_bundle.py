"""``cytoedge export bundle``: gated export folders in, a verified bundle out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.bundle_assembly import AssemblyError, assemble_bundle
from runtime.bundle_format import QcSpec, load_bundle
from tests.runtime_models import MIL_TASKS, encoder_model, head_model

PASSED = {"passed": True, "min_cosine": 0.9999999, "max_abs_diff": 2e-6}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def exports(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    enc = tmp_path / "enc"
    encoder_model(enc / "encoder.onnx", rng.normal(size=(3, 8)), 32)
    encoder_model(enc / "encoder.int8.onnx", rng.normal(size=(3, 8)), 32)
    write_json(
        enc / "export.json",
        {
            "kind": "encoder",
            "section": {
                "architecture": "vit_small_patch14_dinov2",
                "embed_dim": 8,
                "variants": {"fp32": "encoder.onnx", "int8": "encoder.int8.onnx"},
                "int8_note": "accepted: min cosine 0.995 on 64 cell images",
            },
            "parity": {"encoder.onnx": PASSED, "encoder.int8.onnx": PASSED},
            "provenance": {"source_sha256": "ab" * 32},
        },
    )
    head = tmp_path / "head"
    for k in range(2):
        head_model(
            head / f"mm.{k}.onnx",
            rng.normal(size=8),
            rng.normal(size=(8, 4)),
            "gated_attention_mil",
        )
    write_json(
        head / "export.json",
        {
            "kind": "head",
            "section": {
                "name": "mm_risk",
                "kind": "gated_attention_mil",
                "files": ["mm.0.onnx", "mm.1.onnx"],
                "tasks": list(MIL_TASKS),
                "thresholds": dict.fromkeys(MIL_TASKS, 0.5),
                "high_risk": ["del17p", "t4_14"],
            },
            "parity": {"mm.0.onnx": PASSED, "mm.1.onnx": PASSED},
        },
    )
    seg = tmp_path / "seg"
    seg.mkdir()
    (seg / "segmenter.onnx").write_bytes(b"segmenter network bytes")
    write_json(
        seg / "segmenter.json",
        {
            "segmenter": {
                "file": "segmenter.onnx",
                "n_rays": 32,
                "grid": [2, 2],
                "div_by": [16, 16],
                "prob_thresh": 0.5,
                "nms_thresh": 0.4,
                "input_channels": 3,
                "normalisation": {"kind": "percentile"},
            },
            "provenance": {
                "parity_max_abs_diff": {"prob": 2e-6, "dist": 3e-5},
                "parity_tolerance": {"prob": 1e-4, "dist": 2e-3},
            },
        },
    )
    sections = write_json(
        tmp_path / "sections.json",
        {
            "stain_reference": {
                "stain_matrix": [[0.6, 0.7, 0.3], [0.1, 0.9, 0.2]],
                "max_concentrations": [1.9, 1.0],
                "intensity_p5": 120,
                "intensity_p95": 230,
            },
            "cells": {"min_cells": 40},
            "provenance": {"validation": {"mean_auc": 0.81}},
        },
    )
    return {"encoder": enc, "head": head, "segmenter": seg, "sections": sections}


def assemble(exports: dict[str, Path], out: Path, **overrides: object) -> object:
    arguments: dict[str, object] = {
        "encoder_dir": exports["encoder"],
        "head_dirs": [exports["head"]],
        "segmenter_dir": exports["segmenter"],
        "name": "mm-risk",
        "version": "1.0.0",
        "intended_use": "research",
        "sections_file": exports["sections"],
    }
    arguments.update(overrides)
    return assemble_bundle(out, **arguments)  # type: ignore[arg-type]


def test_cli_assembles_a_bundle_that_loads(exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    command = [
        sys.executable, "-m", "appliance", "export", "bundle", str(out),
        "--encoder", str(exports["encoder"]), "--head", str(exports["head"]),
        "--segmenter", str(exports["segmenter"]), "--sections", str(exports["sections"]),
        "--name", "mm-risk", "--version", "1.0.0", "--intended-use", "research",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Bundle mm-risk 1.0.0 (research)" in result.stdout
    made = load_bundle(out)
    assert made.encoder.variants == {"fp32": "encoder.onnx", "int8": "encoder.int8.onnx"}
    assert made.head("mm_risk").files == ("heads/mm.0.onnx", "heads/mm.1.onnx")
    assert made.segmenter is not None and made.segmenter.div_by == (16, 16)
    assert made.stain_reference is not None and made.cells.min_cells == 40
    assert made.provenance["validation"] == {"mean_auc": 0.81}
    assert made.provenance["encoder"]["parity"]["encoder.int8.onnx"]["passed"] is True
    assert made.provenance["heads"]["mm_risk"]["parity"]["mm.1.onnx"]["passed"] is True
    # the same command again refuses to overwrite, with one line
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)
    assert again.returncode == 1 and "exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_a_failed_or_missing_gate_is_refused(exports: dict[str, Path], tmp_path: Path) -> None:
    document = json.loads((exports["encoder"] / "export.json").read_text())
    document["parity"]["encoder.int8.onnx"] = {"passed": False, "min_cosine": 0.93}
    write_json(exports["encoder"] / "export.json", document)
    with pytest.raises(AssemblyError, match=r"encoder\.int8\.onnx failed its parity gate"):
        assemble(exports, tmp_path / "b1")
    del document["parity"]["encoder.int8.onnx"]
    write_json(exports["encoder"] / "export.json", document)
    with pytest.raises(AssemblyError, match=r"encoder\.int8\.onnx has no parity report"):
        assemble(exports, tmp_path / "b2")
    document["parity"]["encoder.int8.onnx"] = PASSED
    write_json(exports["encoder"] / "export.json", document)
    (exports["head"] / "export.json").unlink()
    with pytest.raises(AssemblyError, match=r"no export\.json; run `cytoedge export heads`"):
        assemble(exports, tmp_path / "b3")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b3").exists()


def test_segmenter_outside_its_tolerance_is_refused(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    path = exports["segmenter"] / "segmenter.json"
    document = json.loads(path.read_text())
    document["provenance"]["parity_max_abs_diff"]["dist"] = 0.5
    write_json(path, document)
    with pytest.raises(AssemblyError, match=r"segmenter\.onnx failed its parity gate"):
        assemble(exports, tmp_path / "bundle")


def test_bad_sections_and_sections_are_named(exports: dict[str, Path], tmp_path: Path) -> None:
    write_json(exports["sections"], {"qc": {"laplacian_min": "high"}})
    with pytest.raises(AssemblyError, match=r"qc\.laplacian_min must be a number"):
        assemble(exports, tmp_path / "b1")
    write_json(exports["sections"], {"heads": []})
    with pytest.raises(AssemblyError, match="unknown section"):
        assemble(exports, tmp_path / "b2")
    # No heads: the networks alone, the version cytoedge train starts from.
    bare = assemble(exports, tmp_path / "b3", head_dirs=[], sections_file=None)
    assert bare.heads == () and bare.encoder.embed_dim > 0  # type: ignore[attr-defined]
    made = assemble(exports, tmp_path / "b4", segmenter_dir=None, sections_file=None)
    # Without a qc section a new bundle carries the current QC (blur judged at 0.5 um/px).
    assert made.segmenter is None and made.qc == QcSpec.current()  # type: ignore[attr-defined]
