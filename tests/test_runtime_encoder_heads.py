"""Encoder and heads runners on a small bundle, checked against numpy twins."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.pipeline.cells import resize_bilinear
from export import crop_input
from export.crop_input import fold_crop_input, fold_in_place
from export.onnx_export import ParityError
from runtime.backends import BackendError, RuntimeSettings
from runtime.bundle_format import HeadSpec, InputSpec, load_bundle
from runtime.encoder import Encoder, EncoderInputError
from runtime.head_kinds import INDETERMINATE, NEGATIVE, POSITIVE, call, combine_calls
from runtime.heads import BagError, HeadRunner, load_heads
from tests.runtime_models import MEAN, STD, TinyBundle, encoder_reference, head_reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    made = TinyBundle(tmp_path_factory.mktemp("tiny"), with_int8=True)
    made.write()
    return made


def normalised(patches: np.ndarray) -> np.ndarray:
    scaled = patches.astype(np.float64) / 255.0 if patches.dtype == np.uint8 else patches
    return ((scaled - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)


def test_encoder_normalises_batches_and_uses_int8_on_cpu(tiny: TinyBundle) -> None:
    encoder = Encoder(load_bundle(tiny.path), RuntimeSettings(batch_size=4))
    assert (encoder.backend_name, encoder.variant) == ("ort-cpu", "int8")
    patches = np.random.default_rng(3).integers(0, 256, size=(11, 32, 32, 3), dtype=np.uint8)
    seen: list[tuple[int, int]] = []
    embeddings = encoder.embed(patches, progress=lambda done, total: seen.append((done, total)))
    assert embeddings.dtype == np.float32 and embeddings.shape == (11, 16)
    expected = encoder_reference(normalised(patches), tiny.int8_w)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    assert seen == [(4, 11), (8, 11), (11, 11)]
    as_float = encoder.embed(patches.astype(np.float32) / 255.0)
    np.testing.assert_allclose(as_float, embeddings, atol=1e-5)
    assert encoder.embed(patches[:0]).shape == (0, 16)


def test_encoder_without_int8_runs_fp32(tmp_path: Path) -> None:
    made = TinyBundle(tmp_path)
    encoder = Encoder(made.write(), RuntimeSettings("ort-cpu", threads=1))
    assert encoder.variant == "fp32" and encoder.batch_size == 16
    patches = np.full((2, 32, 32, 3), 200, dtype=np.uint8)
    expected = encoder_reference(normalised(patches), made.encoder_w)
    np.testing.assert_allclose(encoder.embed(patches), expected, atol=1e-5)


def test_encoder_refuses_wrong_patches(tiny: TinyBundle) -> None:
    encoder = Encoder(load_bundle(tiny.path))
    with pytest.raises(EncoderInputError, match=r"must be \(N, 32, 32, 3\)"):
        encoder.embed(np.zeros((2, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(EncoderInputError, match="uint8 or float"):
        encoder.embed(np.zeros((2, 32, 32, 3), dtype=np.int32))


def test_mil_head_averages_members_and_calls(tiny: TinyBundle) -> None:
    runner = load_heads(load_bundle(tiny.path))["mm_risk"]
    features = np.random.default_rng(4).normal(size=(7, 16)).astype(np.float32)
    result = runner.predict(features)
    refs = [head_reference(features, aw, ow, "gated_attention_mil") for aw, ow in tiny.mil]
    probabilities = np.mean([r[0] for r in refs], axis=0)
    np.testing.assert_allclose(list(result.probabilities.values()), probabilities, atol=1e-5)
    np.testing.assert_allclose(result.attention, np.mean([r[1] for r in refs], 0), atol=1e-6)
    assert result.attention.shape == (7,) and abs(result.attention.sum() - 1) < 1e-5
    assert result.member_probabilities.shape == (2, 4)
    spec = runner.spec
    for prediction, p in zip(result.predictions, probabilities, strict=True):
        threshold = spec.thresholds[prediction.task]
        assert prediction.threshold == threshold
        assert prediction.call == call(p, threshold, spec.indeterminate_band)
    assert result.predictions[0].label == "del(17p)"
    calls = {p.task: p.call for p in result.predictions}
    (high_risk,) = result.findings
    assert high_risk.key == "high_risk"
    assert high_risk.call == combine_calls([calls["del17p"], calls["t4_14"]])
    # The rule's wording comes from the bundle: its high_risk tasks, by their labels.
    assert high_risk.label == "High risk (del(17p) or t(4;14))"


def test_transformer_head_gives_malignancy_top2_and_hemoglobin(tiny: TinyBundle) -> None:
    runner = HeadRunner(load_bundle(tiny.path), "pb_screen", RuntimeSettings("ort-cpu"))
    features = np.random.default_rng(5).normal(size=(1, 16)).astype(np.float32)
    result = runner.predict(features)
    refs = [head_reference(features, aw, ow, "transformer_mil") for aw, ow in tiny.pb]
    probabilities = np.mean([r[0] for r in refs], axis=0)
    classes = list(result.probabilities)
    np.testing.assert_allclose(list(result.probabilities.values()), probabilities, atol=1e-5)
    (prediction,) = result.predictions
    assert prediction.task == "malignancy" and prediction.threshold == 0.5
    assert prediction.probability == pytest.approx(probabilities[:3].sum(), abs=1e-5)
    findings = {f.key: f for f in result.findings}
    order = np.argsort(-probabilities)[:2]
    expected_top2 = ", ".join(f"{classes[i]} {probabilities[i]:.2f}" for i in order)
    assert findings["top2"].text == expected_top2
    hemoglobin = findings["hemoglobin"].value
    assert hemoglobin == pytest.approx(np.mean([r[2] for r in refs]), abs=1e-4)
    np.testing.assert_allclose(result.attention, [1.0], atol=1e-6)


def test_bags_of_1_7_and_5000_cells(tiny: TinyBundle) -> None:
    runner = HeadRunner(load_bundle(tiny.path), "mm_risk")
    rng = np.random.default_rng(6)
    for cells in (1, 7, 5000):
        features = rng.normal(size=(cells, 16)).astype(np.float32)
        result = runner.predict(features)
        expected = np.mean(
            [head_reference(features, a, o, "gated_attention_mil")[0] for a, o in tiny.mil], 0
        )
        np.testing.assert_allclose(list(result.probabilities.values()), expected, atol=1e-5)
        assert result.attention.shape == (cells,)


def test_bad_bags_are_refused(tiny: TinyBundle) -> None:
    runner = HeadRunner(load_bundle(tiny.path), "mm_risk")
    with pytest.raises(BagError, match="empty"):
        runner.predict(np.zeros((0, 16), dtype=np.float32))
    with pytest.raises(BagError, match=r"must be \(N, 16\)"):
        runner.predict(np.zeros((3, 8), dtype=np.float32))


def test_calls_and_their_combination() -> None:
    assert call(0.56, 0.5, 0.05) == POSITIVE
    assert call(0.55, 0.5, 0.05) == POSITIVE
    assert call(0.54, 0.5, 0.05) == INDETERMINATE
    assert call(0.45, 0.5, 0.05) == INDETERMINATE
    assert call(0.44, 0.5, 0.05) == NEGATIVE
    assert call(0.5, 0.5, 0.0) == POSITIVE
    assert combine_calls([NEGATIVE, POSITIVE]) == POSITIVE
    assert combine_calls([NEGATIVE, INDETERMINATE]) == INDETERMINATE
    assert combine_calls([NEGATIVE, NEGATIVE]) == NEGATIVE


def test_calibration_is_applied_to_the_ensemble_mean(tmp_path: Path) -> None:
    made = TinyBundle(tmp_path)
    platt = {"kind": "platt", "a": dict.fromkeys(made.heads[0].outputs, 2.0)}
    platt["b"] = dict.fromkeys(made.heads[0].outputs, -0.5)
    heads = [
        HeadSpec(**{**made.heads[0].__dict__, "calibration": platt}),
        HeadSpec(
            **{**made.heads[1].__dict__, "calibration": {"kind": "temperature", "temperature": 2.0}}
        ),
    ]
    bundle = made.write(heads=heads)
    features = np.random.default_rng(8).normal(size=(9, 16)).astype(np.float32)
    mil = HeadRunner(bundle, "mm_risk").predict(features)
    raw = mil.member_probabilities.astype(np.float64).mean(axis=0)
    logits = np.log(raw / (1 - raw))
    expected = 1 / (1 + np.exp(-(2.0 * logits - 0.5)))
    np.testing.assert_allclose(list(mil.probabilities.values()), expected, atol=1e-5)
    pb = HeadRunner(bundle, "pb_screen").predict(features)
    raw = pb.member_probabilities.astype(np.float64).mean(axis=0)
    tempered = np.exp(np.log(raw) / 2.0)
    np.testing.assert_allclose(
        list(pb.probabilities.values()), tempered / tempered.sum(), atol=1e-5
    )


def bilinear_2x(side: int) -> np.ndarray:
    """(2 side, side) weights of a half-pixel bilinear 2x upscale, edges clamped."""
    weights = np.zeros((2 * side, side))
    for out in range(2 * side):
        x = min(max((out + 0.5) / 2 - 0.5, 0.0), side - 1.0)
        left = int(np.floor(x))
        right = min(left + 1, side - 1)
        weights[out, left] += 1 - (x - left)
        weights[out, right] += x - left
    return weights


def test_a_folded_encoder_takes_uint8_crops_and_matches_the_runtimes_own_resizing(
    tmp_path: Path,
) -> None:
    made = TinyBundle(tmp_path / "float")
    float_bundle = made.write()
    folded = tmp_path / "folded.onnx"
    fold_crop_input(made.sources["encoder.onnx"], folded, 16, 32, MEAN, STD)
    crop_spec = dataclasses.replace(
        made.encoder, input=InputSpec(size=32, mean=MEAN, std=STD, crop_px=16)
    )
    folded_bundle = TinyBundle(tmp_path / "crops").write(
        sources={**made.sources, "encoder.onnx": folded}, encoder=crop_spec
    )
    settings = RuntimeSettings("ort-cpu", threads=1)
    crops = np.random.default_rng(5).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    encoder = Encoder(folded_bundle, settings)
    assert encoder.fed_px == 16 and encoder.preprocess(crops).dtype == np.uint8
    exact = np.einsum(
        "yi,nijc,xj->nyxc", bilinear_2x(16), crops.astype(np.float64), bilinear_2x(16)
    )
    expected = encoder_reference(normalised(exact / 255.0), made.encoder_w)
    np.testing.assert_allclose(encoder.embed(crops), expected, atol=1e-5)
    # What the runtime fed before: Pillow's resize, rounded to uint8 (up to a grey level off).
    resized = np.stack([resize_bilinear(c, 32) for c in crops])
    before = Encoder(float_bundle, settings).embed(resized)
    np.testing.assert_allclose(encoder.embed(crops), before, atol=2e-2)
    with pytest.raises(EncoderInputError, match=r"must be \(N, 16, 16, 3\)"):
        encoder.embed(resized)
    with pytest.raises(EncoderInputError, match="uint8 crops"):
        encoder.embed(crops.astype(np.float32) / 255)
    with pytest.raises(BackendError, match=r"uint8 crops|says"):
        Encoder(TinyBundle(tmp_path / "mismatch").write(encoder=crop_spec), settings)


def test_a_fold_that_changes_the_embeddings_is_refused_and_leaves_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = TinyBundle(tmp_path)
    path = tmp_path / "encoder.onnx"
    shutil.copy(made.sources["encoder.onnx"], path)
    before = path.read_bytes()
    fold = crop_input.fold_crop_input

    def channels_swapped(*args: object) -> None:  # a fold that gets the channel order wrong
        *head, mean, std = args
        fold(*head, tuple(reversed(mean)), tuple(reversed(std)))  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(crop_input, "fold_crop_input", channels_swapped)
        with pytest.raises(ParityError, match="folded"):
            fold_in_place(path, "fp32", 16, 32, MEAN, STD)
    assert path.read_bytes() == before and list(tmp_path.glob(".encoder.onnx.*")) == []
    report = fold_in_place(path, "fp32", 16, 32, MEAN, STD)
    assert report.passed and report.metrics["min_cosine"] > 0.9999
