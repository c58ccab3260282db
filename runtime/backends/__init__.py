"""Inference backends behind one interface; ``open_model`` picks and loads one.

The surface: ``open_model(model, RuntimeSettings(...))`` -> a ``Backend``;
``plan_backends`` / ``probe_backends`` say what this machine can run and why;
``backend_names()`` lists the registered backends in the automatic order. Each
backend is one module of this package (``ort_cpu.py``, ``ort_cuda.py``,
``ort_tensorrt.py``, ``trt.py``, ``ov.py``, ``triton.py``); heavy modules (tensorrt,
cuda-python, onnxruntime, openvino, tritonclient) are imported only when a backend
that needs them probes or loads.
"""

from runtime.backends.base import (
    Backend,
    BackendError,
    BackendStatus,
    BackendUnavailableError,
    Fallback,
    ModelVariants,
    RuntimeSettings,
    TensorSpec,
    TritonSettings,
)
from runtime.backends.choice import open_model, plan_backends
from runtime.backends.registry import AUTO, backend_class, backend_names, probe_backends

__all__ = [
    "AUTO",
    "Backend",
    "BackendError",
    "BackendStatus",
    "BackendUnavailableError",
    "Fallback",
    "ModelVariants",
    "RuntimeSettings",
    "TensorSpec",
    "TritonSettings",
    "backend_class",
    "backend_names",
    "open_model",
    "plan_backends",
    "probe_backends",
]
