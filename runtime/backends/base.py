"""The one interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The automatic choice tries these in order; the configuration may name one.
BACKEND_ORDER = ("tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu")


class BackendError(RuntimeError):
    """A model that cannot be loaded or run; the message is one line with the reason."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: a dimension is an int, or a name/None when it is dynamic."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class Fallback:
    """A better backend that was skipped, and why."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


@dataclass(frozen=True)
class ModelVariants:
    """The files of one network: fp32 always; fp16 for GPUs and int8 for CPUs when present."""

    fp32: Path
    fp16: Path | None = None
    int8: Path | None = None

    def for_backend(self, backend: str) -> tuple[str, Path]:
        """(variant, file) a backend should load.

        TensorRT builds its fp16 engine from fp32 ONNX (its own fp16 conversion keeps
        LayerNorm and softmax in fp32); ORT's CUDA provider needs an fp16 ONNX file;
        the CPU runs int8 only when the bundle accepted it.
        """
        if backend == "ort-cuda" and self.fp16 is not None:
            return "fp16", self.fp16
        if backend == "ort-cpu" and self.int8 is not None:
            return "int8", self.int8
        return "fp32", self.fp32


class Backend(ABC):
    """A loaded network. ``run`` takes and returns numpy arrays keyed by tensor name."""

    def __init__(self, name: str, path: Path, variant: str) -> None:
        self.name = name  # which backend runs it: one of BACKEND_ORDER
        self.path = path
        self.variant = variant
        # Filled in by open_model: the better backends that were skipped.
        self.fallbacks: list[Fallback] = []

    @property
    @abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def preferred_batch(self) -> int:
        """The batch size this backend runs best at along the first axis."""
        return 16

    @property
    def max_batch(self) -> int | None:
        """The largest first-axis size it accepts; None when unbounded."""
        return None

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds (device memory, sessions)."""

    def describe(self) -> str:
        """One line for logs and ``cytoedge doctor``."""
        text = f"{self.name} ({self.variant}) {self.path.name}"
        if self.fallbacks:
            text += "; skipped " + "; ".join(str(f) for f in self.fallbacks)
        return text

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Refuse missing or unknown inputs and wrong ranks with a one-line reason."""
        expected = {spec.name: spec for spec in self.inputs}
        missing = sorted(set(expected) - set(feeds))
        unknown = sorted(set(feeds) - set(expected))
        if missing or unknown:
            raise BackendError(
                f"{self.path.name}: inputs {sorted(expected)} expected; "
                f"missing {missing}, unknown {unknown}"
            )
        for name, array in feeds.items():
            spec = expected[name]
            if array.ndim != len(spec.shape):
                raise BackendError(
                    f"{self.path.name}: input {name} needs {len(spec.shape)} dimensions "
                    f"{spec.shape}, got shape {array.shape}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise BackendError(
                        f"{self.path.name}: input {name} axis {axis} must be {want}, "
                        f"got shape {array.shape}"
                    )
