"""TensorRT engine cache rules (here, without TensorRT) and the engine backend (GPU only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import runtime.engines as engines
from runtime.probe import gpu_names
from tests.runtime_models import encoder_model, encoder_reference, head_model, head_reference

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(
    not (HAS_TENSORRT and gpu_names()), reason="needs TensorRT and an NVIDIA GPU"
)


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Stand-ins for the GPU identity and TensorRT version, which this machine lacks."""
    identity = {"gpu": "NVIDIA H100 80GB HBM3", "cc": "9.0", "trt": "10.7.0"}
    monkeypatch.setattr(engines, "device_identity", lambda: (identity["gpu"], identity["cc"]))
    monkeypatch.setattr(engines, "tensorrt_version", lambda: identity["trt"])
    return identity


def fake_build(onnx_path: Path, engine_path: Path, **_: object) -> None:
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(b"engine for " + onnx_path.read_bytes()[:16])


def test_cache_is_keyed_and_stale_engines_are_rebuilt(
    tmp_path: Path, fake_device: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle"
    onnx_path = head_model(
        bundle / "heads" / "mm.0.onnx", np.ones(4), np.ones((4, 2)), "gated_attention_mil"
    )
    built: list[Path] = []

    def counting_build(onnx_path: Path, engine_path: Path, **kwargs: object) -> None:
        built.append(engine_path)
        fake_build(onnx_path, engine_path)

    monkeypatch.setattr(engines, "build_engine", counting_build)
    engine_dir = bundle / "engines"
    engine = engines.ensure_engine(onnx_path, engine_dir)
    assert engine == engine_dir / "heads__mm.0.engine" and len(built) == 1
    sidecar = json.loads(engines.sidecar_path(engine).read_text())
    assert sidecar["key"]["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert sidecar["key"]["compute_capability"] == "9.0"
    assert sidecar["key"]["tensorrt_version"] == "10.7.0"
    assert sidecar["key"]["onnx_sha256"] == engines.file_sha256(onnx_path)
    assert sidecar["key"]["profiles"]["features"] == [1, 512, 20_000]

    assert engines.ensure_engine(onnx_path, engine_dir) == engine and len(built) == 1

    fake_device["gpu"] = "NVIDIA L4"  # the bundle was copied to another site
    key = engines.engine_key(onnx_path)
    assert engines.stale_reason(engine, key) == "built for another gpu name"
    with pytest.raises(engines.StaleEngineError, match="cytoedge export engines"):
        engines.ensure_engine(onnx_path, engine_dir, build=False)
    engines.ensure_engine(onnx_path, engine_dir)
    assert len(built) == 2

    fake_device["trt"] = "10.9.0"
    assert "tensorrt version" in str(engines.stale_reason(engine, engines.engine_key(onnx_path)))
    engines.ensure_engine(onnx_path, engine_dir)
    assert len(built) == 3

    engine.write_bytes(b"truncated")  # a damaged engine is never loaded
    assert "does not match" in str(engines.stale_reason(engine, engines.engine_key(onnx_path)))
    engines.sidecar_path(engine).unlink()
    assert "missing or unreadable" in str(
        engines.stale_reason(engine, engines.engine_key(onnx_path))
    )


def test_a_changed_onnx_file_makes_its_engine_stale(
    tmp_path: Path, fake_device: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "build_engine", fake_build)
    path = encoder_model(tmp_path / "encoder.onnx", np.ones((3, 4)), 8)
    engine = engines.ensure_engine(path, tmp_path / "engines")
    encoder_model(path, np.full((3, 4), 2.0), 8)
    reason = engines.stale_reason(engine, engines.engine_key(path))
    assert reason == "built for another onnx sha256"


@needs_gpu
def test_tensorrt_engine_matches_onnx_runtime(tmp_path: Path) -> None:
    from runtime.backends import RuntimeSettings, open_model

    weight = np.random.default_rng(0).normal(size=(3, 32))
    path = encoder_model(tmp_path / "encoder.onnx", weight, 32)
    backend = open_model(path, RuntimeSettings("tensorrt"))
    assert backend.name == "tensorrt" and backend.variant == "fp16"
    assert backend.preferred_batch == 64 and backend.max_batch == 256
    assert backend.inputs[0].dtype == np.float16  # fp16 engines take fp16 pixels
    pixels = np.random.default_rng(1).normal(size=(9, 3, 32, 32)).astype(np.float32)
    out = backend.run({"pixels": pixels})["embedding"]
    np.testing.assert_allclose(out, encoder_reference(pixels, weight), atol=2e-2)
    again = open_model(
        path, RuntimeSettings("tensorrt", build_engines=False)
    )  # cached now: loads, no build
    np.testing.assert_allclose(again.run({"pixels": pixels})["embedding"], out, atol=1e-6)
    backend.close()
    again.close()


@needs_gpu
def test_tensorrt_head_takes_bags_of_1_to_5000(tmp_path: Path) -> None:
    from runtime.backends import RuntimeSettings, open_model

    rng = np.random.default_rng(2)
    aw, ow = rng.normal(size=16), rng.normal(size=(16, 4))
    path = head_model(tmp_path / "heads" / "h.0.onnx", aw, ow, "gated_attention_mil")
    backend = open_model(path, RuntimeSettings("tensorrt"), engine_dir=tmp_path / "engines")
    assert backend.max_batch == 20_000
    for cells in (1, 7, 5000):
        features = rng.normal(size=(cells, 16)).astype(np.float32)
        out = backend.run({"features": features})
        probabilities, attention, _ = head_reference(features, aw, ow, "gated_attention_mil")
        np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-2)
        assert out["attention"].shape == (cells,)
        np.testing.assert_allclose(out["attention"], attention, atol=1e-2)
    backend.close()


def test_a_model_tensorrt_cannot_take_is_recorded_not_retried(
    tmp_path: Path, fake_device: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[Path] = []

    def refuse(onnx_path: Path, engine_path: Path, **_: object) -> None:
        attempts.append(onnx_path)
        raise engines.UnsupportedModelError(f"{onnx_path.name}: dynamic H and W")

    monkeypatch.setattr(engines, "build_engine", refuse)
    path = encoder_model(tmp_path / "segmenter.onnx", np.ones((3, 4)), 8)
    for _ in range(2):
        with pytest.raises(engines.UnsupportedModelError, match="dynamic H and W"):
            engines.ensure_engine(path, tmp_path / "engines")
    assert len(attempts) == 1
    fake_device["trt"] = "10.9.0"  # a new TensorRT may take it: tried again
    with pytest.raises(engines.UnsupportedModelError):
        engines.ensure_engine(path, tmp_path / "engines")
    assert len(attempts) == 2


def test_ort_tensorrt_profiles_follow_the_batch_table(
    tmp_path: Path, fake_device: dict[str, str]
) -> None:
    from onnx import TensorProto, helper, save

    from runtime.backends.base import BackendError
    from runtime.backends.ort_tensorrt import provider_options

    path = encoder_model(tmp_path / "encoder.onnx", np.ones((3, 4)), 16)
    options, max_batch = provider_options(path, tmp_path / "engines")
    assert options["trt_profile_min_shapes"] == "pixels:1x3x16x16"
    assert options["trt_profile_opt_shapes"] == "pixels:64x3x16x16"
    assert options["trt_profile_max_shapes"] == "pixels:256x3x16x16"
    assert max_batch == 256 and options["trt_fp16_enable"] is True
    cache = Path(str(options["trt_engine_cache_path"]))
    assert cache.parent == tmp_path / "engines" / "ort-tensorrt" and cache.is_dir()
    fake_device["gpu"] = "NVIDIA L4"  # another GPU gets another cache folder
    assert provider_options(path, tmp_path / "engines")[0]["trt_engine_cache_path"] != str(cache)

    spatial = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["prob"])],
        "segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", "h", "w", 3])],
    )
    dynamic = tmp_path / "segmenter.onnx"
    save(helper.make_model(spatial, opset_imports=[helper.make_opsetid("", 17)]), str(dynamic))
    with pytest.raises(BackendError, match="dynamic axes besides the first"):
        provider_options(dynamic, tmp_path / "engines")
