"""ONNX Runtime on the CPU: the backend every site has, and the last resort of "auto"."""

from __future__ import annotations

from runtime.backends.ort import OrtBackend


class OrtCpuBackend(OrtBackend):
    name = "ort-cpu"
    priority = 40
    files = ("int8", "fp32")  # int8 only when the bundle lists it (listed means accepted)
    provider = "CPUExecutionProvider"
    needs_gpu = False
    # A 257-token ViT's matmuls are large already at batch 1: a batch only bounds memory.
    batch = 16
