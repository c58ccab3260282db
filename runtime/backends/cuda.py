"""The CUDA runtime through cuda-python (no torch): device identity and memory."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from runtime.backends.base import BackendError
from runtime.probe import gpu_info


def cuda_runtime() -> ModuleType:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendError("cuda-python is not installed (pip install cuda-python)") from None
    return runtime


def check(result: tuple[Any, ...]) -> Any:
    """Unwrap cuda-python's (error, value...) tuples, raising on any error."""
    cudart = cuda_runtime()
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(error)
        raise BackendError(f"CUDA error {error}: {text.decode(errors='replace')}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@functools.cache
def device_identity() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of device 0, the one engines run on."""
    try:
        cudart = cuda_runtime()
        props = check(cudart.cudaGetDeviceProperties(0))
        name = props.name
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"
    except BackendError:
        gpus = gpu_info()
        if not gpus:
            raise BackendError("no GPU visible") from None
        return gpus[0].name, gpus[0].compute_capability


class DeviceBuffer:
    """Device memory that grows to the largest size asked of it."""

    def __init__(self) -> None:
        self.pointer = 0
        self.capacity = 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.free()
            self.pointer = int(check(cuda_runtime().cudaMalloc(max(nbytes, 1))))
            self.capacity = nbytes
        return self.pointer

    def free(self) -> None:
        if self.pointer:
            check(cuda_runtime().cudaFree(self.pointer))
            self.pointer = 0
            self.capacity = 0
