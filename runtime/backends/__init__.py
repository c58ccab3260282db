"""Inference backends behind one interface; ``open_model`` picks and loads one.

Heavy modules (tensorrt, cuda-python, onnxruntime) are imported only when a
backend that needs them is loaded.
"""

from runtime.backends.base import (
    BACKEND_ORDER,
    Backend,
    BackendError,
    Fallback,
    ModelVariants,
    TensorSpec,
)
from runtime.backends.choice import open_model, plan_backends

__all__ = [
    "BACKEND_ORDER",
    "Backend",
    "BackendError",
    "Fallback",
    "ModelVariants",
    "TensorSpec",
    "open_model",
    "plan_backends",
]
