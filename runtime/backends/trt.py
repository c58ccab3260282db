"""TensorRT (>= 10) engines run through the tensor-name API, memory via cuda-python.

First in the automatic order: an fp16 engine built for this GPU from the fp32 ONNX
file (runtime.engines builds and caches it; a stale one is rebuilt, never loaded).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from runtime.backends.base import (
    Backend,
    BackendError,
    BackendStatus,
    ModelVariants,
    RuntimeSettings,
    TensorSpec,
)
from runtime.backends.cuda import DeviceBuffer, check, cuda_runtime
from runtime.probe import cuda_python_present, gpu_names, package_version


class TensorrtBackend(Backend):
    """One deserialized engine with one execution context and one CUDA stream.

    ``path`` is the ONNX file the engine was built from (what the bundle names);
    the engine itself is ``engine_path``. Inputs are cast to the engine's own input
    dtype (fp16 for fp16 engines), so callers may pass float32.
    """

    name = "tensorrt"
    priority = 10
    files = ("fp32",)  # its own fp16 conversion keeps LayerNorm and softmax in fp32

    @classmethod
    def probe(cls) -> BackendStatus:
        version = package_version("tensorrt")
        if version is None:
            return BackendStatus(cls.name, False, "tensorrt is not installed")
        if not cuda_python_present():
            return BackendStatus(
                cls.name, False, f"TensorRT {version}, but cuda-python is not installed"
            )
        if not gpu_names():
            return BackendStatus(cls.name, False, f"TensorRT {version}; no GPU visible")
        return BackendStatus(cls.name, True, f"TensorRT {version}")

    @classmethod
    def load(
        cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path
    ) -> TensorrtBackend:
        from runtime.engines import ensure_engine

        _, path = cls.choose_file(variants)
        return cls(path, ensure_engine(path, engines, build=settings.build_engines))

    def __init__(self, path: Path, engine_path: Path, variant: str = "fp16") -> None:
        super().__init__(path, variant)
        import tensorrt as trt

        self._trt = trt
        self._cudart = cuda_runtime()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"{engine_path.name}: TensorRT cannot deserialize the engine")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{engine_path.name}: no execution context (GPU memory?)")
        self._stream = check(self._cudart.cudaStreamCreate())
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._limits: dict[str, tuple[int, int, int]] = {}
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
            spec = TensorSpec(name, shape, dtype)
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(spec)
                low, opt, high = self._engine.get_tensor_profile_shape(name, 0)
                self._limits[name] = (int(low[0]), int(opt[0]), int(high[0]))
            else:
                self._outputs.append(spec)
        self._buffers: dict[str, DeviceBuffer] = {
            spec.name: DeviceBuffer() for spec in self._inputs + self._outputs
        }

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @property
    def preferred_batch(self) -> int:
        return min(opt for _, opt, _ in self._limits.values())

    @property
    def max_batch(self) -> int | None:
        return min(high for _, _, high in self._limits.values())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        cudart = self._cudart
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        held: list[np.ndarray] = []  # host arrays must outlive the asynchronous copies
        for spec in self._inputs:
            array = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            low, _, high = self._limits[spec.name]
            if not low <= array.shape[0] <= high:
                raise BackendError(
                    f"{self.path.name}: {spec.name} has {array.shape[0]} rows; "
                    f"this engine takes {low} to {high}"
                )
            held.append(array)
            if not self._context.set_input_shape(spec.name, array.shape):
                raise BackendError(f"{self.path.name}: shape {array.shape} refused for {spec.name}")
            pointer = self._buffers[spec.name].reserve(array.nbytes)
            check(
                cudart.cudaMemcpyAsync(
                    pointer, array.ctypes.data, array.nbytes, to_device, self._stream
                )
            )
            self._context.set_tensor_address(spec.name, pointer)
        results: dict[str, np.ndarray] = {}
        for spec in self._outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            results[spec.name] = np.empty(shape, dtype=spec.dtype)
            pointer = self._buffers[spec.name].reserve(results[spec.name].nbytes)
            self._context.set_tensor_address(spec.name, pointer)
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendError(f"{self.path.name}: TensorRT execution failed")
        for spec in self._outputs:
            out = results[spec.name]
            check(
                cudart.cudaMemcpyAsync(
                    out.ctypes.data,
                    self._buffers[spec.name].pointer,
                    out.nbytes,
                    to_host,
                    self._stream,
                )
            )
        check(cudart.cudaStreamSynchronize(self._stream))
        return results

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()
        if self._stream is not None:
            check(self._cudart.cudaStreamDestroy(self._stream))
            self._stream = None
        self._context = None
        self._engine = None

    def __del__(self) -> None:
        # At interpreter shutdown CUDA may be torn down already.
        with contextlib.suppress(Exception):
            self.close()
