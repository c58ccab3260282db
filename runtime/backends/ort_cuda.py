"""ONNX Runtime's CUDA provider: the fp16 ONNX file when the bundle has one."""

from __future__ import annotations

from runtime.backends.ort import OrtBackend


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    priority = 30
    files = ("fp16", "fp32")
    provider = "CUDAExecutionProvider"
