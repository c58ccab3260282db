"""Which backend runs a model: the configured one, or the best that loads here."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from runtime.backends.base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    Fallback,
    ModelVariants,
    RuntimeSettings,
)
from runtime.backends.registry import AUTO, backend_class, probe_backends

log = logging.getLogger(__name__)


AVOIDED = "failed the GPU self-test on this machine (see cytoedge doctor --gpu-self-test)"


def plan_backends(
    backend: str = AUTO, avoid: Collection[str] = ()
) -> tuple[list[str], list[Fallback]]:
    """(backends to try in order, backends skipped up front and why).

    Skipping up front needs no model: a package or provider that is missing, no GPU,
    or a backend in ``avoid``. A backend that is present but fails to load a model is
    found by open_model.
    """
    if backend != AUTO:
        backend_class(backend)  # an unknown name is refused, naming the known ones
    candidates: list[str] = []
    skipped: list[Fallback] = []
    for status in probe_backends():
        if backend not in (AUTO, status.name):
            continue
        if backend == AUTO and backend_class(status.name).remote:
            continue  # not a better backend skipped: one the site chooses by name
        if status.name in avoid:
            skipped.append(Fallback(status.name, AVOIDED))
        elif status.available:
            candidates.append(status.name)
        else:
            skipped.append(Fallback(status.name, status.detail))
    return candidates, skipped


def open_model(
    model: Path | str | ModelVariants,
    settings: RuntimeSettings | None = None,
    *,
    engine_dir: Path | None = None,
) -> Backend:
    """Load ``model`` on ``settings.backend`` ("auto": the backend and precision the
    measured choice put first for this network, ``settings.prefer``, then the first in
    the automatic order that loads it).

    ``engine_dir`` is where compiled engines are cached (default: ``engines/`` beside
    the ONNX file). Every skipped backend is logged and kept in ``.fallbacks``. A
    configured backend that cannot load raises BackendError.
    """
    settings = settings or RuntimeSettings()
    variants = model if isinstance(model, ModelVariants) else ModelVariants(fp32=Path(model))
    if not variants.fp32.is_file():
        raise BackendError(f"{variants.fp32}: model file not found")
    engines = engine_dir or variants.fp32.parent / "engines"
    candidates, fallbacks = plan_backends(settings.backend, settings.avoid)
    precisions: dict[str, str] = {}
    if settings.backend == AUTO:
        measured = measured_first(variants.fp32.name, settings.prefer, candidates)
        if measured is not None:
            candidates.remove(measured[0])
            candidates.insert(0, measured[0])
            precisions[measured[0]] = measured[1]
    for fallback in fallbacks:
        # Expected on most sites (no GPU, no TensorRT): every session would repeat them.
        log.debug("not using %s for %s: %s", fallback.backend, variants.fp32.name, fallback.reason)
    unreachable = False  # the configured backend's server did not answer: a later try may
    for name in candidates:
        cls = backend_class(name)
        try:
            precision = precisions.get(name, settings.precision)
            loaded = cls.load(variants, replace(settings, precision=precision), engines)
        except (BackendError, OSError) as exc:
            # OSError: e.g. a read-only bundle folder where engines cannot be cached.
            fallback = Fallback(name, str(exc))
            log.warning("not using %s for %s: %s", name, variants.fp32.name, fallback.reason)
            fallbacks.append(fallback)
            unreachable = isinstance(exc, BackendUnavailableError)
            continue
        loaded.fallbacks = fallbacks + loaded.fallbacks  # a remote one's local model has its own
        # The choice in one line; the reasons of the skipped backends are at DEBUG
        # above and in ``describe()``, which ``cytoedge doctor`` shows.
        skipped = f" (skipped {', '.join(f.backend for f in fallbacks)})" if fallbacks else ""
        log.info("%s runs on %s (%s)%s", loaded.path.name, loaded.name, loaded.variant, skipped)
        return loaded
    reasons = "; ".join(str(f) for f in fallbacks)
    if settings.backend != AUTO:
        error = BackendUnavailableError if unreachable else BackendError
        raise error(
            f"configured backend {settings.backend} cannot run {variants.fp32.name}: {reasons}"
        )
    raise BackendError(f"no backend can run {variants.fp32.name}: {reasons}")


def measured_first(
    network: str, prefer: Collection[tuple[str, str, str]], candidates: list[str]
) -> tuple[str, str] | None:
    """(backend, precision) measured fastest for the network whose fp32 file is named
    ``network``, when that backend is among ``candidates`` (present and not avoided)."""
    for name, backend, precision in prefer:
        if name == network and backend in candidates:
            return backend, precision
    return None
