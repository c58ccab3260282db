"""Backend choice and the ONNX Runtime backend, on this CPU-only machine."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import runtime.backends.choice as choice
from runtime.backends import BackendError, ModelVariants, open_model, plan_backends
from runtime.probe import BackendStatus
from tests.runtime_models import encoder_model, encoder_reference


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    weight = np.random.default_rng(0).normal(size=(3, 8))
    return encoder_model(tmp_path / "encoder.onnx", weight, 16), weight


def statuses(**available: bool) -> list[BackendStatus]:
    names = ("tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu")
    return [
        BackendStatus(n, available.get(n.replace("-", "_"), False), f"{n} probed") for n in names
    ]


def test_auto_runs_on_the_cpu_here_and_records_why(model: tuple[Path, np.ndarray]) -> None:
    path, weight = model
    backend = open_model(path)
    assert backend.name == "ort-cpu" and backend.variant == "fp32"
    assert [f.backend for f in backend.fallbacks] == ["tensorrt", "ort-tensorrt", "ort-cuda"]
    assert all(f.reason for f in backend.fallbacks)
    assert "skipped tensorrt" in backend.describe()
    (spec,) = backend.inputs
    assert spec.name == "pixels" and spec.shape[1:] == (3, 16, 16) and spec.dtype == np.float32
    assert [s.name for s in backend.outputs] == ["embedding"]
    pixels = np.random.default_rng(1).normal(size=(5, 3, 16, 16))
    out = backend.run({"pixels": pixels})  # float64 in: cast to the model's float32
    np.testing.assert_allclose(out["embedding"], encoder_reference(pixels, weight), atol=1e-5)


def test_bad_feeds_get_one_line_reasons(model: tuple[Path, np.ndarray]) -> None:
    backend = open_model(model[0], "ort-cpu", threads=1)
    with pytest.raises(BackendError, match=r"missing \['pixels'\]"):
        backend.run({"image": np.zeros((1, 3, 16, 16))})
    with pytest.raises(BackendError, match="needs 4 dimensions"):
        backend.run({"pixels": np.zeros((3, 16, 16))})
    with pytest.raises(BackendError, match="axis 2 must be 16"):
        backend.run({"pixels": np.zeros((1, 3, 15, 16))})


def test_configured_backend_that_is_absent_is_an_error(model: tuple[Path, np.ndarray]) -> None:
    with pytest.raises(BackendError, match=r"configured backend ort-cuda cannot run encoder\.onnx"):
        open_model(model[0], "ort-cuda")
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        open_model(model[0], "cuda")


def test_unloadable_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="model file not found"):
        open_model(tmp_path / "absent.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(BackendError, match="onnxruntime cannot load it"):
        open_model(broken)


def test_expected_fallbacks_log_at_debug_and_the_choice_in_one_info_line(
    model: tuple[Path, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A CPU-only site: TensorRT and CUDA are absent, which every session would repeat.
    monkeypatch.setattr(choice, "probe_backends", lambda: statuses(ort_cpu=True))
    with caplog.at_level(logging.DEBUG, logger="runtime.backends.choice"):
        backend = open_model(model[0])
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.levelname for r in loud] == ["INFO"]
    line = loud[0].getMessage()
    assert "runs on ort-cpu (fp32)" in line and "skipped tensorrt, ort-tensorrt, ort-cuda" in line
    assert "probed" not in line  # the reasons are not repeated at INFO...
    quiet = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("probed" in m for m in quiet) == 3  # ...they are at DEBUG
    assert "ort-cuda probed" in backend.describe()  # and what cytoedge doctor shows


def test_a_gpu_provider_that_does_not_initialise_falls_back_with_its_reason(
    model: tuple[Path, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Pretend the probe saw CUDA; this CPU-only onnxruntime cannot start it, so the
    # session comes up on the CPU provider and the backend must notice and fall back.
    monkeypatch.setattr(choice, "probe_backends", lambda: statuses(ort_cuda=True, ort_cpu=True))
    with (
        caplog.at_level(logging.INFO, logger="runtime.backends.choice"),
        pytest.warns(UserWarning, match="CUDAExecutionProvider"),
    ):
        backend = open_model(model[0])
    assert backend.name == "ort-cpu"
    cuda = [f for f in backend.fallbacks if f.backend == "ort-cuda"]
    assert len(cuda) == 1 and "CUDAExecutionProvider did not initialise" in cuda[0].reason
    assert any("not using ort-cuda" in r.getMessage() for r in caplog.records)


def test_plan_follows_the_order_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "probe_backends", lambda: statuses(ort_cuda=True, ort_cpu=True))
    candidates, skipped = plan_backends("auto")
    assert candidates == ["ort-cuda", "ort-cpu"]
    assert [f.backend for f in skipped] == ["tensorrt", "ort-tensorrt"]
    assert plan_backends("ort-cpu") == (["ort-cpu"], [])


def test_variant_per_backend(tmp_path: Path) -> None:
    variants = ModelVariants(tmp_path / "a.onnx", tmp_path / "a16.onnx", tmp_path / "a8.onnx")
    assert variants.for_backend("ort-cpu") == ("int8", tmp_path / "a8.onnx")
    assert variants.for_backend("ort-cuda") == ("fp16", tmp_path / "a16.onnx")
    # TensorRT makes its own fp16 engine from the fp32 graph.
    assert variants.for_backend("tensorrt") == ("fp32", tmp_path / "a.onnx")
    assert ModelVariants(tmp_path / "a.onnx").for_backend("ort-cpu")[0] == "fp32"
