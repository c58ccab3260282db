"""The GPU self-test's comparisons, on CPU stand-ins for GPU backends.

Two stand-in accelerators wrap ONNX Runtime on the CPU: one computes in half
precision (inputs and outputs rounded to fp16, reported as fp16), as a GPU's
fp16 path would; one drifts in fp32 by more than the export allows. The real
GPU run is the test marked ``gpu`` at the end, skipped without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.config import Config, PathsConfig, RuntimeConfig
from appliance.service.follow import BundleFollower
from appliance.site import backend_check as self_test
from appliance.site import doctor
from appliance.site.backend_check import (
    REFERENCE,
    avoided_backends,
    compare_embeddings,
    compare_heads,
    compare_segmenter,
    run_self_test,
    site_settings,
    write_record,
)
from appliance.site.measured_choice import preferred_paths, recorded_choices
from runtime.backends import (
    Backend,
    BackendStatus,
    ModelVariants,
    RuntimeSettings,
    TensorSpec,
    backend_names,
    open_model,
)
from runtime.backends.choice import AVOIDED
from runtime.backends.ort_cpu import OrtCpuBackend
from runtime.bundle_format import Bundle
from runtime.probe import gpu_names
from tests.runtime_models import TinyBundle
from tests.test_cli import cytoedge

STAND_INS = ["toy-half", "toy-drift"]


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Register the two stand-in accelerators for one test (the registry is restored)."""
    backend_names()  # the real backends register in the real registry first
    monkeypatch.setattr(Backend, "registered", dict(Backend.registered))

    class Wrapped(Backend):
        precision = "fp32"

        @classmethod
        def probe(cls) -> BackendStatus:
            return BackendStatus(cls.name, True, "stand-in accelerator")

        @classmethod
        def load(cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path) -> Backend:
            _, path = cls.choose_file(variants)
            return cls(path, OrtCpuBackend(path, "fp32", threads=1))

        def __init__(self, path: Path, inner: Backend) -> None:
            super().__init__(path, self.precision)
            self.inner = inner

        @property
        def inputs(self) -> list[TensorSpec]:
            return self.inner.inputs

        @property
        def outputs(self) -> list[TensorSpec]:
            return self.inner.outputs

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs = self.inner.run({k: self.convert(v) for k, v in feeds.items()})
            return {k: self.convert(v) for k, v in outputs.items()}

        def convert(self, array: np.ndarray) -> np.ndarray:
            return array

        def close(self) -> None:
            self.inner.close()

    class Half(Wrapped):
        name = "toy-half"
        priority = 1
        precision = "fp16"

        def convert(self, array: np.ndarray) -> np.ndarray:
            return np.asarray(array, np.float32).astype(np.float16).astype(np.float32)

    class Drift(Wrapped):
        name = "toy-drift"
        priority = 2

        def convert(self, array: np.ndarray) -> np.ndarray:
            rng = np.random.default_rng(array.size)
            return np.asarray(array, np.float32) * (1 + 0.01 * rng.normal(size=array.shape))

    # Defining them registered them.
    assert (Backend.registered["toy-half"], Backend.registered["toy-drift"]) == (Half, Drift)
    yield STAND_INS


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return TinyBundle(tmp_path).write()


@pytest.fixture
def a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine reports a GPU (nvidia-smi is not asked)."""
    for module in (self_test, doctor):
        monkeypatch.setattr(module, "gpu_names", lambda: ["Stand-in GPU"])


def test_each_backend_is_held_to_the_limit_of_the_precision_it_ran(
    stand_ins: list[str], bundle: Bundle
) -> None:
    report = run_self_test(bundle, RuntimeSettings(threads=1), backends=[*stand_ins, REFERENCE])
    rows = {(m.network, m.backend): m for m in report.measurements}
    assert {network for network, _ in rows} == {"encoder", "head mm_risk", "head pb_screen"}
    half, drift = rows["encoder", "toy-half"], rows["encoder", "toy-drift"]
    assert (half.variant, half.passed, half.limits) == ("fp16", True, {"min_cosine": ">= 0.999"})
    assert (drift.variant, drift.passed) == ("fp32", False)
    assert drift.limits == {"min_cosine": ">= 0.99999"}
    assert 0.99 < drift.metrics["min_cosine"] < 0.99999
    for head in ("head mm_risk", "head pb_screen"):
        assert rows[head, "toy-half"].limits == {"changed_calls": "== 0"}
        assert rows[head, "toy-half"].passed, rows[head, "toy-half"]
        assert rows[head, "toy-drift"].passed is False
        assert rows[head, "toy-drift"].metrics["max_probability_diff"] > 1e-4
        reference = rows[head, REFERENCE]
        assert reference.passed and reference.metrics["max_probability_diff"] == 0.0
    for row in report.measurements:
        assert row.unit == "cell" and row.seconds_per_unit > 0
    assert not report.passed and report.avoid == ("toy-drift",)


def test_a_backend_that_does_not_load_is_reported_not_failed(bundle: Bundle) -> None:
    report = run_self_test(bundle, RuntimeSettings(threads=1), backends=["tensorrt", REFERENCE])
    trt = [m for m in report.measurements if m.backend == "tensorrt"]
    assert trt and all(m.passed is None and m.detail for m in trt)
    assert report.passed and report.avoid == ()


def test_the_cpu_reference_is_never_avoided_even_when_its_int8_encoder_drifts(
    tmp_path: Path,
) -> None:
    # The test bundle's int8 encoder has other weights on purpose: it cannot agree.
    with_int8 = TinyBundle(tmp_path, with_int8=True).write()
    report = run_self_test(with_int8, RuntimeSettings(threads=1), backends=[REFERENCE])
    encoder = next(m for m in report.measurements if m.network == "encoder")
    assert (encoder.variant, encoder.passed, encoder.limits) == (
        "int8",
        False,
        {"min_cosine": ">= 0.99"},
    )
    assert not report.passed and report.avoid == ()


def test_comparisons_at_and_beyond_their_limits() -> None:
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(4, 64))
    same = {"embedding": embedding.copy()}
    assert compare_embeddings({"embedding": embedding}, same, "fp32")[2]
    noisy = {"embedding": embedding + rng.normal(0, 0.02, embedding.shape)}
    metrics, limits, passed = compare_embeddings({"embedding": embedding}, noisy, "fp16")
    assert passed == (metrics["min_cosine"] >= 0.999) and limits["min_cosine"] == ">= 0.999"
    assert not compare_embeddings({"embedding": embedding}, noisy, "fp32")[2]

    prob, dist = rng.uniform(size=(1, 8, 8, 1)), rng.uniform(5, 20, (1, 8, 8, 32))
    assert compare_segmenter({"prob": prob, "dist": dist}, {"prob": prob, "dist": dist}, "fp32")[2]
    assert not compare_segmenter(
        {"prob": prob, "dist": dist}, {"prob": prob, "dist": dist + 3e-3}, "fp32"
    )[2]

    head = {
        "probabilities": np.array([0.2, 0.7]),
        "attention": np.array([0.1, 0.2, 0.7]),
        "values": np.array([12.5]),
        "calls": np.array(["negative", "positive", "positive"]),
    }
    nudged = {**head, "probabilities": head["probabilities"] + 5e-4}
    assert compare_heads(head, nudged, "fp16")[2]  # same calls: reduced precision passes
    assert not compare_heads(head, nudged, "fp32")[2]  # 5e-4 > 1e-4 at fp32
    flipped = {**nudged, "calls": np.array(["negative", "indeterminate", "positive"])}
    metrics, _, passed = compare_heads(head, flipped, "fp16")
    assert not passed and metrics["changed_calls"] == 1
    hemoglobin = {**head, "values": np.array([12.6])}
    assert not compare_heads(head, hemoglobin, "fp32")[2]


def test_the_result_is_kept_per_bundle_and_machine_and_scoring_avoids_what_failed(
    stand_ins: list[str], bundle: Bundle, tmp_path: Path, a_gpu: None, monkeypatch
) -> None:
    state = tmp_path / "state"
    report = run_self_test(bundle, RuntimeSettings(threads=1), backends=stand_ins)
    write_record(state, bundle, report)
    assert avoided_backends(state, bundle) == ("toy-drift",)
    settings = site_settings(RuntimeSettings(threads=1), state, bundle)
    assert settings.avoid == ("toy-drift",)
    model = open_model(bundle.file("heads/mm_risk.0.onnx"), settings)
    assert model.name == "toy-half"
    skipped = {f.backend: f.reason for f in model.fallbacks}
    assert skipped["toy-drift"] == AVOIDED
    # Another GPU (or another software version): the result no longer holds.
    monkeypatch.setattr(self_test, "gpu_names", lambda: ["Another GPU"])
    assert avoided_backends(state, bundle) == ()


def test_doctor_without_a_gpu_says_so_and_exits_cleanly(bundle: Bundle) -> None:
    if gpu_names():
        pytest.skip("this machine has a GPU")
    result = cytoedge("doctor", "--gpu-self-test", "--bundle", str(bundle.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GPU self-test: no GPU visible on this machine; nothing to compare it with." in (
        result.stdout
    )


def test_doctor_runs_the_self_test_prints_it_and_keeps_it(
    stand_ins: list[str],
    bundle: Bundle,
    a_gpu: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = Config(paths=PathsConfig(data_dir=str(tmp_path / "data")))
    code = doctor.run_doctor(config, bundle.path, gpu_self_test=True)
    out = capsys.readouterr().out
    assert code == 1
    assert "GPU self-test against ort-cpu (fp32), same inputs" in out
    assert "FAIL" in out and "pass" in out and "s/cell" in out
    assert "Not used for this bundle here: toy-drift" in out
    assert "GPU self-test: FAILED" in out
    assert avoided_backends(config.state_dir, bundle) == ("toy-drift",)


def test_the_service_runs_it_before_its_first_job_on_a_gpu_and_then_avoids_what_failed(
    stand_ins: list[str], bundle: Bundle, tmp_path: Path, a_gpu: None
) -> None:
    config = Config(paths=PathsConfig(data_dir=str(tmp_path / "data"), bundle=str(bundle.path)))
    opened: list[RuntimeSettings] = []

    def open_engine(opened_bundle: Bundle, settings: RuntimeSettings) -> object:
        opened.append(settings)
        return object()

    follower = BundleFollower(config, open_engine)  # type: ignore[arg-type]
    follower.open()
    stages: list[str] = []
    switched = follower(lambda stage, fraction: stages.append(stage))
    assert switched is not None and switched[1].sha256 == bundle.sha256
    assert [s.avoid for s in opened] == [(), ("toy-drift",)]
    assert any("on toy-half" in stage for stage in stages)
    # The CPU paths' choice came from the same run: nothing was measured twice.
    assert stages.count("encoder on ort-cpu") == 1
    assert {c.network for c in recorded_choices(config.state_dir, bundle)} == {"encoder"}
    assert opened[-1].prefer == preferred_paths(config.state_dir, bundle)
    assert follower(lambda stage, fraction: None) is None  # once per bundle and machine
    # The next start reads the kept result: no self-test, the backend still avoided.
    again = BundleFollower(config, open_engine)  # type: ignore[arg-type]
    again.open()
    assert opened[-1].avoid == ("toy-drift",)
    assert again(lambda stage, fraction: stages.append("again")) is None
    assert "again" not in stages


def test_without_a_gpu_the_service_runs_no_self_test(bundle: Bundle, tmp_path: Path) -> None:
    if gpu_names():
        pytest.skip("this machine has a GPU")
    config = Config(
        paths=PathsConfig(data_dir=str(tmp_path / "data"), bundle=str(bundle.path)),
        runtime=RuntimeConfig(measure_on_start=False),
    )
    follower = BundleFollower(config, lambda b, s: object())  # type: ignore[arg-type,return-value]
    follower.open()
    assert follower(lambda stage, fraction: None) is None
    assert not (config.state_dir / self_test.RECORD_DIR).exists()


@pytest.mark.gpu
def test_on_a_real_gpu_every_backend_that_loads_agrees_with_the_cpu(bundle: Bundle) -> None:
    if not gpu_names():
        pytest.skip("no GPU visible")
    report = run_self_test(bundle, RuntimeSettings())
    loaded = [m for m in report.measurements if m.passed is not None]
    assert {m.backend for m in loaded} - {REFERENCE}, "no GPU backend loaded"
    assert report.passed, [m for m in loaded if not m.passed]


def test_engines_are_built_one_by_one_with_progress_that_keeps_a_watchdog_fed(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build itself needs a GPU; the order, the progress and the refusal of a network
    TensorRT cannot take are checked with a stand-in for ``ensure_engine``."""
    import time

    from runtime import engines

    built: list[str] = []

    def ensure_engine(onnx: Path, engines_dir: Path, *, build: bool = True) -> Path:
        time.sleep(0.05)  # a long build: the ticker reports meanwhile
        if onnx.name == "mm_risk.1.onnx":
            raise engines.UnsupportedModelError("dynamic axes besides the first")
        built.append(onnx.name)
        return engines_dir / f"{onnx.stem}.engine"

    monkeypatch.setattr(engines, "ensure_engine", ensure_engine)
    monkeypatch.setattr(self_test, "TICK_SECONDS", 0.01)
    reports: list[tuple[str, float]] = []
    self_test.build_engines(bundle, lambda stage, fraction: reports.append((stage, fraction)))
    assert built == ["encoder.onnx", "mm_risk.0.onnx", *(f"pb_screen.{k}.onnx" for k in range(3))]
    encoder_ticks = [r for r in reports if r == ("TensorRT engine for encoder.onnx", 0.0)]
    assert len(encoder_ticks) >= 2  # reported again while the build ran
    assert reports[-1] == ("TensorRT engines ready", 1.0)
    assert [f for _, f in reports] == sorted(f for _, f in reports)


def test_a_progress_function_that_refuses_stops_the_ticks_not_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    monkeypatch.setattr(self_test, "TICK_SECONDS", 0.01)
    calls: list[str] = []

    def refusing(stage: str, fraction: float) -> None:
        calls.append(stage)
        raise RuntimeError("the service is stopping")

    with self_test._ticking(refusing, "building", 0.5):
        time.sleep(0.1)
    assert calls == ["building"]
