"""ONNX Runtime's CUDA provider: the fp16 ONNX file when the bundle has one."""

from __future__ import annotations

from pathlib import Path

from runtime.backends.base import BackendStatus, ModelVariants, RuntimeSettings
from runtime.backends.ort import OrtBackend, provider_status


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    priority = 30
    files = ("fp16", "fp32")
    provider = "CUDAExecutionProvider"
    batch = 64

    @classmethod
    def probe(cls) -> BackendStatus:
        return provider_status(cls.name, cls.provider, needs_gpu=True)

    @classmethod
    def load(
        cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path
    ) -> OrtCudaBackend:
        variant, path = cls.choose_file(variants)
        return cls(path, variant, threads=settings.threads)
