"""Paths chosen by measurement: the parity gate of each precision on the real tiny
bundle (OpenVINO here, a bf16 stand-in and one that drifts), the fastest passing path
chosen and kept per bundle and machine, and open_model following it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.config import Config, PathsConfig
from appliance.site import doctor, measured_choice
from appliance.site.backend_check import Measurement, run_self_test, site_settings
from appliance.site.measured_choice import (
    NETWORKS,
    choose,
    preferred_paths,
    recorded_choices,
    write_choice,
)
from runtime.backends import (
    Backend,
    BackendStatus,
    ModelVariants,
    RuntimeSettings,
    TensorSpec,
    backend_names,
    open_model,
)
from runtime.backends.ort_cpu import OrtCpuBackend
from runtime.bundle_format import Bundle, load_bundle
from runtime.probe import CpuInfo
from tests.runtime_models import TinyBundle


def bf16(array: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (8 bits of mantissa) and back, to nearest even."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


@pytest.fixture
def bf16_stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Two CPU stand-ins at bf16 over ONNX Runtime fp32: one feeds its inputs rounded
    to bf16; one also drifts every output by 10 % (the registry is restored after)."""
    backend_names()  # the real backends register in the real registry first
    monkeypatch.setattr(Backend, "registered", dict(Backend.registered))

    class Rounded(Backend):
        name = "toy-bf16"
        priority = 60

        @classmethod
        def probe(cls) -> BackendStatus:
            return BackendStatus(cls.name, True, "stand-in bf16 CPU")

        @classmethod
        def precisions(cls, variants: ModelVariants) -> tuple[str, ...]:
            return ("bf16",)

        @classmethod
        def load(cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path) -> Backend:
            return cls(variants.fp32, OrtCpuBackend(variants.fp32, "fp32", threads=1))

        def __init__(self, path: Path, inner: Backend) -> None:
            super().__init__(path, "bf16")
            self.inner = inner

        @property
        def inputs(self) -> list[TensorSpec]:
            return self.inner.inputs

        @property
        def outputs(self) -> list[TensorSpec]:
            return self.inner.outputs

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs = self.inner.run({k: bf16(v) for k, v in feeds.items()})
            return {k: self.convert(v) for k, v in outputs.items()}

        def convert(self, array: np.ndarray) -> np.ndarray:
            return array

        def close(self) -> None:
            self.inner.close()

    class Drifting(Rounded):
        name = "toy-bf16-drift"
        priority = 61

        def convert(self, array: np.ndarray) -> np.ndarray:
            rng = np.random.default_rng(array.size)
            return np.asarray(array, np.float32) * (1 + 0.1 * rng.normal(size=array.shape))

    yield ["toy-bf16", "toy-bf16-drift"]


@pytest.fixture(scope="module")
def tiny(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


def test_the_gates_pass_the_real_paths_and_refuse_one_that_drifts(
    tiny: Bundle, bf16_stand_ins: list[str], tmp_path: Path
) -> None:
    names = ["ort-cpu", *bf16_stand_ins]
    pytest.importorskip("openvino")
    names.append("openvino")
    report = run_self_test(tiny, RuntimeSettings(threads=1), backends=names, networks=NETWORKS)
    rows = {(m.network, m.backend, m.variant): m for m in report.measurements}
    assert {network for network, _, _ in rows} == {"encoder", "segmenter"}
    for network in NETWORKS:
        assert rows[network, "openvino", "fp32"].passed, rows[network, "openvino", "fp32"]
        assert rows[network, "ort-cpu", "fp32"].passed
        rounded, drift = rows[network, "toy-bf16", "bf16"], rows[network, "toy-bf16-drift", "bf16"]
        assert rounded.passed, rounded
        assert drift.passed is False, drift
    # bf16 is judged as fp16 on the encoder, by detection parity on the segmenter.
    assert rows["encoder", "toy-bf16", "bf16"].limits == {"min_cosine": ">= 0.999"}
    assert rows["encoder", "toy-bf16-drift", "bf16"].metrics["min_cosine"] < 0.999
    segmenter = rows["segmenter", "toy-bf16", "bf16"].metrics
    assert segmenter["reference_detections"] > 0 and segmenter["missing"] == 0
    drifted = rows["segmenter", "toy-bf16-drift", "bf16"].metrics
    assert drifted["missing"] > 0 or drifted["extra"] > 0.01 * drifted["reference_detections"]
    # The drifting path is never chosen, however fast it was.
    chosen = {(c.network, c.backend) for c in choose(tiny, report.measurements)}
    assert not any(backend == "toy-bf16-drift" for _, backend in chosen)
    assert {network for network, _ in chosen} == set(NETWORKS)


def row(network: str, backend: str, variant: str, passed: bool | None, seconds: float):
    return Measurement(network, backend, variant, passed, seconds_per_unit=seconds, unit="cell")


def test_the_fastest_path_that_passed_is_chosen_kept_and_followed(
    tiny: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    measurements = [
        row("encoder", "ort-cpu", "int8", True, 0.08),
        row("encoder", "ort-cpu", "fp32", True, 0.20),
        row("encoder", "openvino", "fp32", True, 0.05),  # fastest that passed
        row("encoder", "toy-fast", "bf16", False, 0.01),  # faster, failed its gate
        row("encoder", "tensorrt", "-", None, 0.0),  # did not load
        row("segmenter", "ort-cpu", "fp32", True, 1.0),
        row("segmenter", "openvino", "fp32", True, 1.5),
        row("head mm", "openvino", "fp32", True, 0.001),  # heads are not chosen here
    ]
    choices = choose(tiny, measurements)
    assert [(c.network, c.file, c.backend, c.precision) for c in choices] == [
        ("encoder", "encoder.onnx", "openvino", "fp32"),
        ("segmenter", "segmenter.onnx", "ort-cpu", "fp32"),
    ]
    state = tmp_path / "state"
    path = write_choice(state, tiny, choices, measurements)
    assert path.parent.name == "measured-choice" and recorded_choices(state, tiny) == choices
    settings = site_settings(RuntimeSettings(threads=1), state, tiny)
    assert settings.prefer == preferred_paths(state, tiny)
    encoder = open_model(tiny.encoder_variants(), settings, engine_dir=tmp_path / "engines")
    assert (encoder.name, encoder.variant) == ("openvino", "fp32")
    segmenter = open_model(tiny.segmenter_variants(), settings)
    assert segmenter.name == "ort-cpu"
    # Another CPU, or other runtime versions: re-measure; until then the fixed order.
    real = measured_choice.cpu_info()
    monkeypatch.setattr(measured_choice, "cpu_info", lambda: CpuInfo("Another CPU", real.flags))
    assert recorded_choices(state, tiny) == []
    assert open_model(
        tiny.encoder_variants(), site_settings(RuntimeSettings(), state, tiny)
    ).name == ("ort-cpu")


def test_a_damaged_record_is_no_choice(tiny: Bundle, tmp_path: Path) -> None:
    path = write_choice(
        tmp_path, tiny, choose(tiny, [row("encoder", "ort-cpu", "fp32", True, 1)]), []
    )
    assert len(recorded_choices(tmp_path, tiny)) == 1
    record = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**record, "choices": [{"network": "encoder"}]}), encoding="utf-8")
    assert recorded_choices(tmp_path, tiny) == []
    path.write_text("{not json", encoding="utf-8")
    assert preferred_paths(tmp_path, tiny) == ()


def test_doctor_self_test_prints_the_table_and_keeps_the_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = TinyBundle(tmp_path).write()  # an encoder and heads, no segmenter
    config = Config(paths=PathsConfig(data_dir=str(tmp_path / "data")))
    code = doctor.run_doctor(config, bundle.path, self_test=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Paths measured on" in out and "cells/s" in out and "<- chosen" in out
    assert "min_cosine" in out
    (choice,) = recorded_choices(config.state_dir, bundle)
    assert choice.network == "encoder" and f"encoder: {choice.backend} at" in out
