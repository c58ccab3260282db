"""The one interface every inference backend implements, and the settings they run with.

A backend is one class in one file of this package: it names itself, says where it
comes in the automatic order, which of a network's files it prefers, how to tell
whether this machine can run it (``probe``) and how to load a model (``load``).
Subclassing ``Backend`` with a ``name`` registers it (``runtime.plugins``);
``runtime.backends.registry`` imports every module of the package, so a new
backend is one new file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from runtime.plugins import Registered


class BackendError(RuntimeError):
    """A model that cannot be loaded or run; the message is one line with the reason."""


class BackendUnavailableError(BackendError):
    """A backend on another machine (an inference server) that did not answer: a later
    try may succeed, so a job that meets it is retried (appliance.service.worker)."""


@dataclass(frozen=True)
class TritonSettings:
    """``[runtime.triton]``: the lab's Triton Inference Server (runtime.backends.triton).

    ``url``: host:port of its gRPC endpoint; ``timeout_seconds``: the longest one
    request may take (0: no limit); ``ca_certificate`` (with ``client_certificate`` and
    ``client_key`` when the server asks for them): TLS, PEM files; ``fallback``:
    "local" runs a network on this workstation's own backends when the server cannot
    be reached or serves another bundle version, "none" makes that an error.
    """

    url: str = ""
    timeout_seconds: float = 60.0
    ca_certificate: str = ""
    client_certificate: str = ""
    client_key: str = ""
    fallback: str = "none"


@dataclass(frozen=True)
class RuntimeSettings:
    """How a bundle's networks run, passed as one value from the configuration down.

    ``backend``: "auto" (the best that loads here) or a registered backend's name;
    ``threads``: CPU threads per session, 0 for one per core; ``batch_size``: cells per
    encoder batch, 0 for the backend's own best; ``build_engines``: False turns a
    missing or stale TensorRT engine into a fallback instead of a build; ``avoid``:
    backends not to use although they load (they failed the GPU self-test here);
    ``prefer``: (network's fp32 file name, backend, precision) the measured choice put
    first for that network here (``appliance.site.measured_choice``), tried before the
    automatic order; ``precision``: the precision a backend is asked to run at, set by
    ``open_model`` from ``prefer`` ("" for the backend's own best).
    """

    backend: str = "auto"
    threads: int = 0
    batch_size: int = 0
    build_engines: bool = True
    avoid: tuple[str, ...] = ()
    prefer: tuple[tuple[str, str, str], ...] = ()
    precision: str = ""
    triton: TritonSettings = TritonSettings()


@dataclass(frozen=True)
class BackendStatus:
    """Whether this machine can run a backend at all, and why (what ``doctor`` prints)."""

    name: str
    available: bool
    detail: str


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
    """The files of one network: fp32 always; fp16 for GPUs and int8 for CPUs when present
    (``int8``: ONNX Runtime's dynamic int8; ``int8_static``: NNCF's, for OpenVINO)."""

    fp32: Path
    fp16: Path | None = None
    int8: Path | None = None
    int8_static: Path | None = None

    def present(self, preference: tuple[str, ...]) -> tuple[str, ...]:
        """The variants of ``preference`` this network has a file for, in that order."""
        return tuple(v for v in preference if getattr(self, v, None) is not None)

    def first_of(self, preference: tuple[str, ...]) -> tuple[str, Path]:
        """(variant, file): the first of ``preference`` this network has, else fp32."""
        for variant in preference:
            path = getattr(self, variant, None)
            if path is not None:
                return variant, path
        return "fp32", self.fp32


class Backend(Registered, ABC):
    """A loaded network. ``run`` takes and returns numpy arrays keyed by tensor name."""

    name: ClassVar[str]  # what the configuration and the logs call it
    priority: ClassVar[int]  # the automatic choice tries lower numbers first
    # Which of a network's files it loads, best first (fp32 is the fallback of all).
    files: ClassVar[tuple[str, ...]] = ("fp32",)
    # A backend on another machine: used only when configured by name, never by "auto"
    # or the measured choice (what it runs on is not this machine's to measure).
    remote: ClassVar[bool] = False
    registered: ClassVar[dict[str, type[Backend]]] = {}

    def __init__(self, path: Path, variant: str) -> None:
        self.path = path
        self.variant = variant  # the precision it runs at: fp32 | fp16 | int8
        # Filled in by open_model: the better backends that were skipped.
        self.fallbacks: list[Fallback] = []

    # -- what each backend class declares --------------------------------------------------
    @classmethod
    @abstractmethod
    def probe(cls) -> BackendStatus:
        """Whether this machine has what the backend needs (packages, provider, GPU)."""

    @classmethod
    @abstractmethod
    def load(cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path) -> Backend:
        """Load the network; ``engines`` is the folder where compiled engines are cached.
        Raises BackendError (or OSError) when it cannot."""

    @classmethod
    def choose_file(cls, variants: ModelVariants, precision: str = "") -> tuple[str, Path]:
        """(variant, file) of ``variants`` this backend loads: ``precision``'s file when
        one is asked for and present, else the first of ``files`` present."""
        return variants.first_of((precision,) if precision else cls.files)

    @classmethod
    def precisions(cls, variants: ModelVariants) -> tuple[str, ...]:
        """The precisions this backend can run ``variants`` at on this machine, each a
        path the measured choice times and gates (``RuntimeSettings.precision``)."""
        return variants.present(cls.files) or ("fp32",)

    # -- a loaded network ------------------------------------------------------------------
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

    @property
    def ran_on(self) -> str:
        """The backend that ran the last inputs, as a result records it: a remote
        backend that fell back to this machine names the local one."""
        return self.name

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
