"""The OpenVINO backend on this machine's CPU: a real compile of the tiny bundle's
networks, its model cache, its precisions and a clean absence."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import runtime.backends.ov as ov
from runtime.backends import BackendError, RuntimeSettings, open_model, plan_backends
from runtime.bundle_format import load_bundle
from runtime.encoder import encoder_feeds
from runtime.parity import ENCODER_MIN_COSINE, row_cosines, stained_field
from runtime.probe import CpuInfo
from tests.runtime_models import encoder_model

pytest.importorskip("openvino")


def test_an_absent_openvino_is_a_reason_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ov, "openvino_version", lambda: None)
    status = ov.OpenVinoBackend.probe()
    assert not status.available and status.detail == "openvino is not installed"
    _, skipped = plan_backends()
    assert ("openvino", "openvino is not installed") in [(f.backend, f.reason) for f in skipped]
    with pytest.raises(BackendError, match="configured backend openvino cannot run"):
        open_model(encoder_model(tmp_path / "e.onnx", np.eye(3), 16), RuntimeSettings("openvino"))


def test_the_encoder_compiles_and_matches_onnx_runtime_at_fp32(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    side = bundle.encoder.input.fed_px
    patches = np.stack([stained_field(side, side, cells=1, seed=i) for i in range(6)])
    feeds = encoder_feeds(bundle.encoder.input, patches)
    reference = open_model(bundle.encoder_variants(), RuntimeSettings("ort-cpu", precision="fp32"))
    candidate = open_model(
        bundle.encoder_variants(),
        RuntimeSettings("openvino", precision="fp32", threads=1),
        engine_dir=tmp_path,
    )
    assert (candidate.name, candidate.variant) == ("openvino", "fp32")
    assert [s.name for s in candidate.outputs] == [s.name for s in reference.outputs]
    got, expected = candidate.run(feeds)["embedding"], reference.run(feeds)["embedding"]
    assert got.shape == expected.shape
    assert row_cosines(expected, got).min() >= ENCODER_MIN_COSINE
    again = candidate.run(feeds)["embedding"]
    np.testing.assert_array_equal(got, again)  # outputs are copies, not the request's buffers


def test_compiled_models_are_cached_per_network_version_and_cpu(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(tiny_bundle)
    settings = RuntimeSettings("openvino", threads=1)
    open_model(bundle.encoder_variants(), settings, engine_dir=tmp_path).close()
    (folder,) = (tmp_path / ov.CACHE_FOLDER).iterdir()
    blobs = sorted(p.name for p in folder.iterdir())
    assert blobs  # OpenVINO wrote its compiled model
    open_model(bundle.encoder_variants(), settings, engine_dir=tmp_path).close()
    assert [p.name for p in (tmp_path / ov.CACHE_FOLDER).iterdir()] == [folder.name]
    assert sorted(p.name for p in folder.iterdir()) == blobs  # read back, not rebuilt
    # Another CPU (here: the same one with one more flag) gets a folder of its own.
    real = ov.cpu_info()
    monkeypatch.setattr(ov, "cpu_info", lambda: CpuInfo(real.model, (*real.flags, "amx_bf16")))
    open_model(bundle.encoder_variants(), settings, engine_dir=tmp_path).close()
    assert len(list((tmp_path / ov.CACHE_FOLDER).iterdir())) == 2


def test_a_precision_the_device_lacks_is_refused_in_one_line(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(tiny_bundle)
    monkeypatch.setattr(ov, "device_and_precisions", lambda core: ("CPU", ("fp32",)))
    assert ov.OpenVinoBackend.precisions(bundle.encoder_variants()) == ("fp32",)
    settings = replace(RuntimeSettings("openvino"), precision="bf16")
    with pytest.raises(BackendError, match=r"runs encoder\.onnx at fp32, not bf16"):
        open_model(bundle.encoder_variants(), settings, engine_dir=tmp_path)
