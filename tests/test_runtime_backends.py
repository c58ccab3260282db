"""Backend choice and the ONNX Runtime backend, on this CPU-only machine."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import runtime.backends.choice as choice
from runtime.backends import (
    BackendError,
    BackendStatus,
    ModelVariants,
    RuntimeSettings,
    backend_class,
    backend_names,
    open_model,
    plan_backends,
)
from tests.runtime_models import encoder_model, encoder_reference


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    weight = np.random.default_rng(0).normal(size=(3, 8))
    return encoder_model(tmp_path / "encoder.onnx", weight, 16), weight


def statuses(**available: bool) -> list[BackendStatus]:
    names = ("tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu", "openvino")
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
    backend = open_model(model[0], RuntimeSettings("ort-cpu", threads=1))
    with pytest.raises(BackendError, match=r"missing \['pixels'\]"):
        backend.run({"image": np.zeros((1, 3, 16, 16))})
    with pytest.raises(BackendError, match="needs 4 dimensions"):
        backend.run({"pixels": np.zeros((3, 16, 16))})
    with pytest.raises(BackendError, match="axis 2 must be 16"):
        backend.run({"pixels": np.zeros((1, 3, 15, 16))})


def test_configured_backend_that_is_absent_is_an_error(model: tuple[Path, np.ndarray]) -> None:
    with pytest.raises(BackendError, match=r"configured backend ort-cuda cannot run encoder\.onnx"):
        open_model(model[0], RuntimeSettings("ort-cuda"))
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        open_model(model[0], RuntimeSettings("cuda"))


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
    assert "runs on ort-cpu (fp32)" in line
    assert "skipped tensorrt, ort-tensorrt, ort-cuda, openvino" in line
    assert "probed" not in line  # the reasons are not repeated at INFO...
    quiet = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("probed" in m for m in quiet) == 4  # ...they are at DEBUG (openvino's too)
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
    assert [f.backend for f in skipped] == ["tensorrt", "ort-tensorrt", "openvino"]
    assert plan_backends("ort-cpu") == (["ort-cpu"], [])


def test_each_backend_chooses_its_own_file(tmp_path: Path) -> None:
    variants = ModelVariants(tmp_path / "a.onnx", tmp_path / "a16.onnx", tmp_path / "a8.onnx")
    assert backend_class("ort-cpu").choose_file(variants) == ("int8", tmp_path / "a8.onnx")
    assert backend_class("ort-cuda").choose_file(variants) == ("fp16", tmp_path / "a16.onnx")
    # TensorRT makes its own fp16 engine from the fp32 graph.
    assert backend_class("tensorrt").choose_file(variants) == ("fp32", tmp_path / "a.onnx")
    only_fp32 = ModelVariants(tmp_path / "a.onnx")
    assert backend_class("ort-cpu").choose_file(only_fp32)[0] == "fp32"


def test_the_registry_holds_every_backend_in_the_automatic_order() -> None:
    assert backend_names() == (
        "tensorrt",
        "ort-tensorrt",
        "ort-cuda",
        "ort-cpu",
        "openvino",
        "triton",
    )


def test_the_measured_choice_comes_first_then_the_automatic_order(
    tmp_path: Path, model: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = model
    int8 = tmp_path / "encoder.int8.onnx"
    int8.write_bytes(path.read_bytes())  # a stand-in file: ORT loads it as int8
    variants = ModelVariants(path, int8=int8)
    monkeypatch.setattr(choice, "probe_backends", lambda: statuses(ort_cpu=True, openvino=True))
    assert open_model(variants).variant == "int8"  # the fixed order: ort-cpu, its int8
    # Measured: ort-cpu at fp32 was fastest for this network; its precision is pinned.
    fp32 = open_model(variants, RuntimeSettings(prefer=(("encoder.onnx", "ort-cpu", "fp32"),)))
    assert (fp32.name, fp32.variant) == ("ort-cpu", "fp32")
    # Another network's choice, an avoided backend or a configured one do not apply.
    other = RuntimeSettings(prefer=(("segmenter.onnx", "ort-cpu", "fp32"),))
    assert open_model(variants, other).variant == "int8"
    assert choice.measured_first("encoder.onnx", [("encoder.onnx", "openvino", "fp32")], []) is None
    assert choice.measured_first(
        "encoder.onnx", [("encoder.onnx", "openvino", "bf16")], ["ort-cpu", "openvino"]
    ) == ("openvino", "bf16")


TOY_BACKEND = """
from pathlib import Path

import numpy as np

from runtime.backends import Backend, BackendStatus, ModelVariants, RuntimeSettings, TensorSpec


class DoublingBackend(Backend):
    \"\"\"A stand-in accelerator: embeds by doubling its input, first in the automatic order.\"\"\"

    name = "toy-doubler"
    priority = 5

    @classmethod
    def probe(cls) -> BackendStatus:
        return BackendStatus(cls.name, True, "toy accelerator present")

    @classmethod
    def load(cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path) -> Backend:
        variant, path = cls.choose_file(variants)
        return cls(path, variant)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("pixels", (None, 3, 16, 16), np.dtype(np.float32))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("embedding", (None, 3, 16, 16), np.dtype(np.float32))]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        return {"embedding": 2 * feeds["pixels"]}

    def close(self) -> None:
        pass
"""


def test_a_backend_is_one_file_the_registry_finds(
    tmp_path: Path, model: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys

    from appliance.config import load_config
    from runtime.backends.base import Backend

    (tmp_path / "toy_backend.py").write_text(TOY_BACKEND, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(Backend, "registered", dict(Backend.registered))  # undone after
    importlib.import_module("toy_backend")
    monkeypatch.delitem(sys.modules, "toy_backend")
    # The automatic order, the configuration's choices and open_model all know it now.
    assert backend_names()[0] == "toy-doubler"
    candidates, _ = plan_backends("auto")
    assert candidates[0] == "toy-doubler"
    loaded = open_model(model[0])
    assert loaded.name == "toy-doubler" and loaded.variant == "fp32"
    pixels = np.ones((2, 3, 16, 16), np.float32)
    np.testing.assert_array_equal(loaded.run({"pixels": pixels})["embedding"], 2 * pixels)
    config = tmp_path / "cytoedge.toml"
    config.write_text('[runtime]\nbackend = "toy-doubler"\n', encoding="utf-8")
    assert load_config(config).runtime.settings.backend == "toy-doubler"
