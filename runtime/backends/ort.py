"""One ONNX Runtime session, shared by the three ORT backends (ort_cpu.py, ort_cuda.py,
ort_tensorrt.py), each of which fixes its execution provider."""

from __future__ import annotations

import logging
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
from runtime.probe import gpu_names, package_version

log = logging.getLogger(__name__)
_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in node.shape)
    dtype = _DTYPES.get(node.type)
    if dtype is None:
        raise BackendError(f"tensor {node.name} has unsupported type {node.type}")
    return TensorSpec(node.name, shape, dtype)


def provider_status(name: str, provider: str, needs_gpu: bool) -> BackendStatus:
    """Whether onnxruntime is installed with ``provider`` (and, if it needs one, a GPU)."""
    version = package_version("onnxruntime")
    if version is None:
        return BackendStatus(name, False, "onnxruntime is not installed")
    import onnxruntime

    if provider not in onnxruntime.get_available_providers():
        return BackendStatus(name, False, f"onnxruntime {version} has no {provider}")
    detail = f"onnxruntime {version}, {provider}"
    if needs_gpu and not gpu_names():
        return BackendStatus(name, False, detail + "; no GPU visible")
    return BackendStatus(name, True, detail)


class OrtBackend(Backend):
    """One ONNX Runtime session; the provider is fixed at load and checked to have stuck.

    Each ORT backend is a subclass naming its provider; the probe and the plain load
    here serve them all.
    """

    provider: ClassVar[str]  # ONNX Runtime's execution provider
    needs_gpu: ClassVar[bool] = True
    batch: ClassVar[int] = 64  # what the provider runs best at along the first axis

    @classmethod
    def probe(cls) -> BackendStatus:
        return provider_status(cls.name, cls.provider, cls.needs_gpu)

    @classmethod
    def load(cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path) -> Backend:
        variant, path = cls.choose_file(variants, settings.precision)
        return cls(path, variant, threads=settings.threads)

    def __init__(
        self,
        path: Path,
        variant: str,
        *,
        threads: int = 0,
        provider_options: dict[str, Any] | None = None,
        max_batch: int | None = None,
    ) -> None:
        super().__init__(path, variant)
        import onnxruntime as ort

        provider = self.provider
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(threads, 0)  # 0: one per core
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers: list[Any] = [(provider, provider_options or {})]
        if provider != "CPUExecutionProvider":
            # Nodes the GPU provider cannot take still need a home.
            providers.append("CPUExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind error types
            raise BackendError(f"{path.name}: onnxruntime cannot load it: {exc}") from None
        active = self._session.get_providers()
        if not active or active[0] != provider:
            # ORT silently drops a provider whose libraries (CUDA, cuDNN, TensorRT) fail to load.
            raise BackendError(f"{provider} did not initialise (active: {', '.join(active)})")
        self._inputs = [_spec(node) for node in self._session.get_inputs()]
        self._outputs = [_spec(node) for node in self._session.get_outputs()]
        self._max_batch = max_batch

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def preferred_batch(self) -> int:
        return self.batch

    @property
    def max_batch(self) -> int | None:
        return self._max_batch

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        cast = {
            spec.name: np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            for spec in self._inputs
        }
        try:
            values = self._session.run(None, cast)
        except Exception as exc:
            raise BackendError(f"{self.path.name}: onnxruntime failed: {exc}") from None
        return {spec.name: value for spec, value in zip(self._outputs, values, strict=True)}

    def close(self) -> None:
        self._session = None
