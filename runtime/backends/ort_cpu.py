"""ONNX Runtime on the CPU: the backend every site has, and the last resort of "auto"."""

from __future__ import annotations

from pathlib import Path

from runtime.backends.base import BackendStatus, ModelVariants, RuntimeSettings
from runtime.backends.ort import OrtBackend, provider_status


class OrtCpuBackend(OrtBackend):
    name = "ort-cpu"
    priority = 40
    files = ("int8", "fp32")  # int8 only when the bundle lists it (listed means accepted)
    provider = "CPUExecutionProvider"
    # A 257-token ViT's matmuls are large already at batch 1: a batch only bounds memory.
    batch = 16

    @classmethod
    def probe(cls) -> BackendStatus:
        return provider_status(cls.name, cls.provider, needs_gpu=False)

    @classmethod
    def load(
        cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path
    ) -> OrtCpuBackend:
        variant, path = cls.choose_file(variants)
        return cls(path, variant, threads=settings.threads)
