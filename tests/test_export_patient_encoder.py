"""GenBloom patient encoder: strict loading of both checkpoint kinds, ONNX export, gates,
the fp16 and int8 variants and which of them a CPU runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import export.patient_export as patient_export
from appliance.cli.main import app
from cytoedge_demo.genbloom import seeded_patient_encoder, write_genbloom_g, write_genbloom_v
from export.bundle_assembly import assemble_bundle
from export.encoder import CheckpointError
from export.onnx_export import ort_session
from export.patient_encoder import load_patient_encoder
from runtime.backends import RuntimeSettings
from runtime.backends.ort_cpu import OrtCpuBackend
from runtime.backends.ort_cuda import OrtCudaBackend
from runtime.bundle_format import Bundle, BundleError, PairedEncoder, PatientEncoderSpec
from runtime.parity import FP16_MIN_COSINE, bag_features, row_cosines
from runtime.patient import PatientEncoder
from tests.export_models import assert_fp16_keeps_fp32_edges
from tests.runtime_models import encoder_model
from tests.test_cli import cytoedge

PASSED = {"passed": True, "min_cosine": 0.9999999, "max_abs_diff": 2e-6}
CELL_DIM = 48  # a narrow encoder keeps the tests fast; GenBloom's is 768
WIDTH = 48


def embed(model: torch.nn.Module, bag: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(bag)).numpy()


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    return seeded_patient_encoder(CELL_DIM, WIDTH, seed=5)


@pytest.fixture(scope="module")
def aligned() -> torch.nn.Module:
    model = seeded_patient_encoder(CELL_DIM, WIDTH, seed=9, projection=True)
    model.output = "projection"
    return model


def encoder_folder(root: Path, embed_dim: int = CELL_DIM, arch: str = "vit_tiny_test") -> Path:
    """What `cytoedge export encoder` leaves: a (small) encoder ONNX and its export.json."""
    folder = root / f"encoder-{arch}-{embed_dim}"
    encoder_model(folder / "encoder.onnx", np.random.default_rng(0).normal(size=(3, embed_dim)), 32)
    section = {"architecture": arch, "embed_dim": embed_dim, "variants": {"fp32": "encoder.onnx"}}
    document = {"kind": "encoder", "section": section, "parity": {"encoder.onnx": PASSED}}
    (folder / "export.json").write_text(json.dumps(document))
    return folder


def bundle_with(folder: Path, encoder_dir: Path, patient_encoder_dir: Path) -> Bundle:
    """A bundle of just the cell encoder and the patient encoder (no segmenter, no heads)."""
    return assemble_bundle(
        folder,
        encoder_dir=encoder_dir,
        segmenter_dir=None,
        patient_encoder_dir=patient_encoder_dir,
        name="t",
        version="1.0.0",
        intended_use="research",
        head_dirs=[],
    )


def test_genbloom_v_loads_strictly_into_the_same_network(
    tower: torch.nn.Module, tmp_path: Path
) -> None:
    path = write_genbloom_v(tower, tmp_path / "genbloom_v.pth")
    loaded = load_patient_encoder(path, "genbloom-v", CELL_DIM, width=WIDTH)
    bag = bag_features(23, CELL_DIM, seed=1)
    np.testing.assert_array_equal(embed(loaded, bag), embed(tower, bag))
    assert embed(loaded, bag).shape == (1, WIDTH)


def test_genbloom_g_gives_the_unit_length_projection_or_the_cls(
    aligned: torch.nn.Module, tmp_path: Path
) -> None:
    path = write_genbloom_g(aligned, tmp_path / "genbloom_g_fold0.pth")
    bag = bag_features(11, CELL_DIM, seed=2)
    projected = load_patient_encoder(path, "genbloom-g", CELL_DIM, width=WIDTH, output="projection")
    out = embed(projected, bag)
    np.testing.assert_allclose(out, embed(aligned, bag), rtol=0, atol=1e-6)
    assert out.shape == (1, 128)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-5)
    cls = load_patient_encoder(path, "genbloom-g", CELL_DIM, width=WIDTH, output="cls")
    assert embed(cls, bag).shape == (1, WIDTH)


def test_genbloom_g_without_its_tower_needs_the_v_file(
    tower: torch.nn.Module, tmp_path: Path
) -> None:
    head_only = seeded_patient_encoder(CELL_DIM, WIDTH, seed=5, projection=True)
    g_path = write_genbloom_g(head_only, tmp_path / "g.pth", with_vision_model=False)
    with pytest.raises(CheckpointError, match="--tower"):
        load_patient_encoder(g_path, "genbloom-g", CELL_DIM, width=WIDTH)
    v_path = write_genbloom_v(tower, tmp_path / "v.pth")
    loaded = load_patient_encoder(g_path, "genbloom-g", CELL_DIM, width=WIDTH, tower=v_path)
    bag = bag_features(5, CELL_DIM, seed=3)
    np.testing.assert_array_equal(embed(loaded, bag), embed(tower, bag))  # same tower, CLS


def test_a_renamed_key_is_named_in_one_line(tower: torch.nn.Module, tmp_path: Path) -> None:
    path = write_genbloom_v(
        tower,
        tmp_path / "renamed.pth",
        rename=("backbone.blocks.2.attn.qkv.weight", "backbone.blocks.2.attn.qkv_w.weight"),
    )
    with pytest.raises(CheckpointError) as caught:
        load_patient_encoder(path, "genbloom-v", CELL_DIM, width=WIDTH)
    assert caught.value.missing == ["blocks.2.attn.qkv.weight"]
    assert caught.value.unexpected == ["blocks.2.attn.qkv_w.weight"]
    assert "\n" not in str(caught.value)


def test_a_file_for_another_cell_encoder_is_refused(tower: torch.nn.Module, tmp_path: Path) -> None:
    path = write_genbloom_v(tower, tmp_path / "v.pth")
    with pytest.raises(
        CheckpointError, match="takes 48-d cell embeddings, but the encoder gives 768-d"
    ):
        load_patient_encoder(path, "genbloom-v", 768, width=WIDTH)
    with pytest.raises(CheckpointError, match="width 48, expected 768"):
        load_patient_encoder(path, "genbloom-v", CELL_DIM)


def test_twelve_blocks_are_not_genbloom(tmp_path: Path) -> None:
    """The loader's default depth of 12 is not what the checkpoints hold: six blocks load."""
    deeper = seeded_patient_encoder(CELL_DIM, WIDTH, seed=4)
    deeper.blocks.extend(seeded_patient_encoder(CELL_DIM, WIDTH, seed=6).blocks)
    path = write_genbloom_v(deeper, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError) as caught:
        load_patient_encoder(path, "genbloom-v", CELL_DIM, width=WIDTH)
    assert not caught.value.missing
    assert {k.split(".")[1] for k in caught.value.unexpected} == {"6", "7", "8", "9", "10", "11"}


@pytest.fixture(scope="module")
def exported(aligned: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI's own export of a GenBloom-G file, paired with a 48-d test encoder."""
    tmp_path = tmp_path_factory.mktemp("patient")
    checkpoint = write_genbloom_g(aligned, tmp_path / "genbloom_g_fold0.pth")
    out = tmp_path / "patient"
    result = CliRunner().invoke(
        app,
        [
            *("export", "patient-encoder", "--checkpoint", str(checkpoint)),
            *("--kind", "genbloom-g", "--output", "projection", "--width", str(WIDTH)),
            *("--encoder", str(encoder_folder(tmp_path)), "--out", str(out)),
            *("--fp16", "--int8"),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def export_v(checkpoint: Path, tmp_path: Path, *variants: str) -> tuple[Path, dict]:
    """`cytoedge export patient-encoder` of a GenBloom-V file: its folder and export.json."""
    out = tmp_path / "patient-v"
    result = CliRunner().invoke(
        app,
        [
            *("export", "patient-encoder", "--checkpoint", str(checkpoint)),
            *("--kind", "genbloom-v", "--width", str(WIDTH)),
            *("--encoder", str(encoder_folder(tmp_path)), "--out", str(out), *variants),
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "export.json").read_text())


@pytest.fixture(scope="module")
def exported_v(tower: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GenBloom-V export with fp16 and int8. Seeded 48-d weights miss int8's 0.99 (their
    lowest cosine is near 0.97), so its limit is lowered here to get a bundle holding
    every variant."""
    tmp_path = tmp_path_factory.mktemp("patient-v")
    checkpoint = write_genbloom_v(tower, tmp_path / "genbloom_v.pth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(patient_export, "INT8_MIN_COSINE", 0.9)
        out, document = export_v(checkpoint, tmp_path, "--fp16", "--int8")
    assert set(document["section"]["variants"]) == {"fp32", "fp16", "int8"}
    return out


def test_export_writes_gated_onnx_for_any_number_of_cells(
    aligned: torch.nn.Module, exported: Path
) -> None:
    out = exported
    document = json.loads((out / "export.json").read_text())
    section = document["section"]
    assert section["encoder"] == {"architecture": "vit_tiny_test", "embed_dim": CELL_DIM}
    assert (section["kind"], section["output"], section["embed_dim"]) == (
        "genbloom-g",
        "projection",
        128,
    )
    assert document["parity"]["patient_encoder.onnx"]["passed"] is True
    assert document["parity"]["patient_encoder.onnx"]["min_cosine"] >= 0.99999
    if "int8" in section["variants"]:  # accepted only with its gate's numbers
        assert document["parity"]["patient_encoder.int8.onnx"]["min_cosine"] >= 0.99
    else:
        assert section["int8_note"].startswith("int8 rejected")
    session = ort_session(out / "patient_encoder.onnx")
    for cells in (2, 64, 513):
        bag = bag_features(cells, CELL_DIM, seed=cells)
        (onnx_out,) = session.run(["embedding"], {"features": bag})
        assert row_cosines(embed(aligned, bag), onnx_out)[0] >= 0.99999


def test_export_refuses_a_wrong_width_in_one_line(tower: torch.nn.Module, tmp_path: Path) -> None:
    checkpoint = write_genbloom_v(tower, tmp_path / "genbloom_v.pth")
    out = tmp_path / "patient"
    result = CliRunner().invoke(
        app,
        [
            *("export", "patient-encoder", "--checkpoint", str(checkpoint)),
            *("--kind", "genbloom-v", "--width", str(WIDTH)),
            *("--encoder", str(encoder_folder(tmp_path, embed_dim=768)), "--out", str(out)),
        ],
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "takes 48-d cell embeddings" in lines[0], result.output
    assert not (out / "patient_encoder.onnx").exists()


def test_the_bundle_keeps_the_pairing_and_refuses_another_encoder(
    exported: Path, tmp_path: Path
) -> None:
    bundle = bundle_with(tmp_path / "bundle", encoder_folder(tmp_path), exported)
    assert bundle.patient_encoder is not None
    assert bundle.patient_encoder.embed_dim == 128
    assert bundle.file(bundle.patient_encoder.variants["fp32"]).is_file()
    with pytest.raises(BundleError) as caught:
        bundle_with(tmp_path / "other", encoder_folder(tmp_path, arch="vit_other"), exported)
    assert "patient_encoder was trained on vit_tiny_test (48-d)" in str(caught.value)
    assert "this bundle's encoder is vit_other (48-d)" in str(caught.value)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("folder", ["exported", "exported_v"])
def test_fp16_is_written_behind_the_encoders_fp16_gate(
    folder: str, request: pytest.FixtureRequest
) -> None:
    out: Path = request.getfixturevalue(folder)
    document = json.loads((out / "export.json").read_text())
    section = document["section"]
    assert section["variants"]["fp16"] == "patient_encoder.fp16.onnx"
    assert section["fp16_note"].startswith("fp16 accepted: min cosine ")
    gate = document["parity"]["patient_encoder.fp16.onnx"]
    assert gate["passed"] is True and gate["min_cosine"] >= FP16_MIN_COSINE
    model = onnx.load(str(out / "patient_encoder.fp16.onnx"))
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert metadata["cytoedge.model"] == "patient_encoder"
    assert metadata["cytoedge.precision"] == "fp16"
    assert_fp16_keeps_fp32_edges(model, layer_norms=13)  # 6 blocks x 2 + the final norm
    # bags the gate did not see, of other lengths
    reference = ort_session(out / "patient_encoder.onnx")
    candidate = ort_session(out / "patient_encoder.fp16.onnx")
    for cells in (2, 64, 513):
        bag = bag_features(cells, CELL_DIM, seed=100 + cells)
        (fp32,) = reference.run(["embedding"], {"features": bag})
        (fp16,) = candidate.run(["embedding"], {"features": bag})
        assert row_cosines(fp32, fp16)[0] >= FP16_MIN_COSINE


def test_a_drifting_fp16_is_refused_with_a_note_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large offset common to every channel of the cell tokens: the LayerNorms remove it
    exactly in fp32, but fp16's spacing at 3000 is 2, so the cells' signal is rounded
    away before it is normalised."""
    drifting = seeded_patient_encoder(CELL_DIM, WIDTH, seed=5)
    with torch.no_grad():
        drifting.patch_embed["project"].bias += 3000.0
    checkpoint = write_genbloom_v(drifting, tmp_path / "genbloom_v.pth")
    monkeypatch.setattr(patient_export, "INT8_MIN_COSINE", 0.9)  # as exported_v: keep int8
    out, document = export_v(checkpoint, tmp_path, "--fp16", "--int8")
    section = document["section"]
    assert section["fp16_note"].startswith("fp16 rejected: min cosine ")
    assert section["fp16_note"].endswith(f"(< {FP16_MIN_COSINE})")
    lowest = float(section["fp16_note"].split()[4])
    assert lowest < FP16_MIN_COSINE
    assert section["variants"] == {
        "fp32": "patient_encoder.onnx",
        "int8": "patient_encoder.int8.onnx",
    }
    assert "patient_encoder.fp16.onnx" not in document["parity"]
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json",
        "patient_encoder.int8.onnx",
        "patient_encoder.onnx",
    ]


def test_a_bundle_with_fp16_validates_and_a_cpu_runs_int8_or_fp32(
    exported: Path, exported_v: Path, tmp_path: Path
) -> None:
    bundle = bundle_with(tmp_path / "every", encoder_folder(tmp_path), exported_v)
    spec = bundle.patient_encoder
    assert spec is not None and spec.fp16_note.startswith("fp16 accepted")
    fp16_file = bundle.file("patient_encoder.fp16.onnx")
    assert bundle.files["patient_encoder.fp16.onnx"].bytes == fp16_file.stat().st_size
    variants = spec.model_variants(bundle.path)
    assert variants.fp16 == fp16_file
    assert OrtCudaBackend.choose_file(variants) == ("fp16", fp16_file)  # a GPU's choice
    assert OrtCpuBackend.choose_file(variants)[0] == "int8"
    on_cpu = RuntimeSettings(backend="ort-cpu")
    bag = bag_features(40, CELL_DIM, seed=8)
    encoder = PatientEncoder(bundle, on_cpu)
    try:
        assert (encoder.variant, encoder.model.path.name) == ("int8", "patient_encoder.int8.onnx")
        embedding = encoder.embed(bag)
    finally:
        encoder.close()
    (fp32,) = ort_session(exported_v / "patient_encoder.onnx").run(["embedding"], {"features": bag})
    assert row_cosines(fp32, embedding[None])[0] >= 0.9  # the gate this int8 passed
    doctor = cytoedge("doctor", "--bundle", str(bundle.path))  # no heads: not ready, but checked
    row = next(line for line in doctor.stdout.splitlines() if "patient encoder" in line)
    assert "ort-cpu" in row and "int8" in row, doctor.stdout
    assert f"Patient encoder fp16: {spec.fp16_note}" in " ".join(doctor.stdout.split())

    # int8 missed its gate here: fp32 and fp16
    fp16_only = bundle_with(tmp_path / "fp16", encoder_folder(tmp_path), exported)
    assert fp16_only.patient_encoder is not None
    assert set(fp16_only.patient_encoder.variants) == {"fp32", "fp16"}
    encoder = PatientEncoder(fp16_only, on_cpu)
    try:
        assert (encoder.variant, encoder.model.path.name) == ("fp32", "patient_encoder.onnx")
    finally:
        encoder.close()


def test_an_unknown_patient_encoder_variant_is_refused_in_one_line() -> None:
    spec = PatientEncoderSpec(
        kind="genbloom-v",
        output="cls",
        cell_dim=CELL_DIM,
        embed_dim=WIDTH,
        encoder=PairedEncoder("vit_tiny_test", CELL_DIM),
        variants={"fp32": "patient_encoder.onnx", "bf16": "patient_encoder.bf16.onnx"},
    )
    with pytest.raises(BundleError) as caught:
        spec.validate("patient_encoder")
    assert str(caught.value) == (
        "patient_encoder.variants: unknown ['bf16'] (allowed: fp32, fp16, int8)"
    )
