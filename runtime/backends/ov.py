"""OpenVINO on the CPU, or on an Intel GPU when one is present: the bundle's fp32 ONNX
compiled at the lowest precision the device runs natively (bf16 on CPUs with AVX-512
bf16 or AMX, f16 on Intel GPUs, f32 otherwise), and the encoder's NNCF static int8
(export/int8_static.py) as precision ``int8`` where the bundle has it.

It comes after ONNX Runtime on the CPU in the automatic order: whether it beats that
(an int8 encoder on AVX2 and VNNI machines) depends on the CPU, so it is chosen where
``cytoedge doctor --self-test`` measured it faster and it passed the parity gate of
the precision it ran at (``appliance.site.measured_choice``). Compiled models are
cached in ``engines/openvino/<key>/`` (OpenVINO's own model cache), the key a digest
of the ONNX file's sha256, the OpenVINO version, the device and precision, and the
CPU's model and flags, so a restart does not recompile and another CPU never reads
this one's blobs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtime.backends.base import (
    Backend,
    BackendError,
    BackendStatus,
    ModelVariants,
    RuntimeSettings,
    TensorSpec,
)
from runtime.engines import file_sha256
from runtime.probe import cpu_info

CACHE_FOLDER = "openvino"
# Our precision names -> OpenVINO's inference precision hint.
HINTS = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}


def openvino_version() -> str | None:
    """The installed openvino's release ("2026.4.1"), None when it is not installed."""
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


def _core() -> Any:
    import openvino

    return openvino.Core()


def device_and_precisions(core: Any) -> tuple[str, tuple[str, ...]]:
    """The device to compile for (an Intel GPU when present, else the CPU) and the
    precisions it can run at, fastest first."""
    if "GPU" in core.available_devices:
        return "GPU", ("fp16", "fp32")
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "CPU", ("bf16", "fp32") if "BF16" in capabilities else ("fp32",)


def cache_key(onnx_sha256: str, version: str, device: str, precision: str) -> str:
    cpu = cpu_info()
    identity = {
        "onnx_sha256": onnx_sha256,
        "openvino": version,
        "device": device,
        "precision": precision,
        "cpu": cpu.model,
        "cpu_flags": list(cpu.flags),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _spec(port: Any) -> TensorSpec:
    shape = tuple(dim.get_length() if dim.is_static else None for dim in port.get_partial_shape())
    try:
        dtype = np.dtype(port.get_element_type().to_dtype())
    except (TypeError, RuntimeError):
        raise BackendError(
            f"tensor {port.get_any_name()} has unsupported type {port.get_element_type()}"
        ) from None
    return TensorSpec(port.get_any_name(), shape, dtype)


class OpenVinoBackend(Backend):
    name = "openvino"
    priority = 50  # after ort-cpu: used first only where measured faster here
    files = ("fp32",)  # it lowers the fp32 graph's precision itself (int8: see precisions)
    batch: ClassVar[int] = 16

    @classmethod
    def probe(cls) -> BackendStatus:
        version = openvino_version()
        if version is None:
            return BackendStatus(cls.name, False, "openvino is not installed")
        try:
            device, precisions = device_and_precisions(_core())
        except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses
            return BackendStatus(cls.name, False, f"openvino {version}: {exc}")
        detail = f"openvino {version}, {device}: {'/'.join(precisions)}"
        return BackendStatus(cls.name, True, detail)

    @classmethod
    def precisions(cls, variants: ModelVariants) -> tuple[str, ...]:
        floats = device_and_precisions(_core())[1]
        # NNCF's static int8 where the bundle has it: last, as whether it beats bf16 is
        # for the self-test to measure on this CPU.
        return (*floats, "int8") if variants.int8_static is not None else floats

    @classmethod
    def load(cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path) -> Backend:
        core = _core()
        device, floats = device_and_precisions(core)
        precisions = cls.precisions(variants)
        precision = settings.precision or precisions[0]
        if precision not in precisions:
            raise BackendError(
                f"openvino on this {device} runs {variants.fp32.name} at "
                f"{'/'.join(precisions)}, not {precision}"
            )
        # int8: the static int8 file, whatever it left unquantised at the device's best float
        path = variants.int8_static if precision == "int8" else variants.fp32
        assert path is not None  # precisions() offers int8 only with the file
        key = cache_key(file_sha256(path), openvino_version() or "", device, precision)
        cache = engines / CACHE_FOLDER / key
        cache.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "CACHE_DIR": str(cache),
            "INFERENCE_PRECISION_HINT": HINTS[floats[0] if precision == "int8" else precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if settings.threads > 0 and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = settings.threads
        try:
            compiled = core.compile_model(str(path), device, config)
        except Exception as exc:
            raise BackendError(f"{path.name}: openvino cannot compile it: {exc}") from None
        return cls(path, precision, compiled)

    def __init__(self, path: Path, variant: str, compiled: Any) -> None:
        super().__init__(path, variant)
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: one run at a time
        self._inputs = [_spec(port) for port in compiled.inputs]
        self._outputs = [_spec(port) for port in compiled.outputs]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def preferred_batch(self) -> int:
        return self.batch

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        cast = {
            spec.name: np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            for spec in self._inputs
        }
        with self._lock:
            try:
                results = self._request.infer(cast)
            except Exception as exc:
                raise BackendError(f"{self.path.name}: openvino failed: {exc}") from None
            # The request's output buffers are reused by the next run: copy them out.
            return {
                spec.name: np.array(results[port], copy=True)
                for spec, port in zip(self._outputs, self._compiled.outputs, strict=True)
            }

    def close(self) -> None:
        self._request = None
        self._compiled = None
