"""Which backend runs a model: the configured one, or the best that loads here."""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.backends.base import (
    BACKEND_ORDER,
    Backend,
    BackendError,
    Fallback,
    ModelVariants,
)
from runtime.probe import probe_backends

log = logging.getLogger(__name__)


def plan_backends(backend: str = "auto") -> tuple[list[str], list[Fallback]]:
    """(backends to try in order, backends skipped up front and why).

    Skipping up front needs no model: a package or provider that is missing, or no
    GPU. A backend that is present but fails to load a model is found by open_model.
    """
    if backend != "auto" and backend not in BACKEND_ORDER:
        raise BackendError(f"unknown backend {backend!r}; one of auto, {', '.join(BACKEND_ORDER)}")
    wanted = BACKEND_ORDER if backend == "auto" else (backend,)
    statuses = {status.name: status for status in probe_backends()}
    candidates: list[str] = []
    skipped: list[Fallback] = []
    for name in wanted:
        status = statuses[name]
        if status.available:
            candidates.append(name)
        else:
            skipped.append(Fallback(name, status.detail))
    return candidates, skipped


def open_model(
    model: Path | str | ModelVariants,
    backend: str = "auto",
    threads: int = 0,
    *,
    engine_dir: Path | None = None,
    build_engines: bool = True,
) -> Backend:
    """Load ``model`` on ``backend`` ("auto": the first of BACKEND_ORDER that loads it).

    ``engine_dir`` is where TensorRT engines are cached (default: ``engines/`` beside
    the ONNX file). With ``build_engines`` False a missing or stale engine is a
    fallback instead of a build. Every skipped backend is logged and kept in
    ``.fallbacks``. A configured backend that cannot load raises BackendError.
    """
    variants = model if isinstance(model, ModelVariants) else ModelVariants(fp32=Path(model))
    if not variants.fp32.is_file():
        raise BackendError(f"{variants.fp32}: model file not found")
    engines = engine_dir or variants.fp32.parent / "engines"
    candidates, fallbacks = plan_backends(backend)
    for fallback in fallbacks:
        # Expected on most sites (no GPU, no TensorRT): every session would repeat them.
        log.debug("not using %s for %s: %s", fallback.backend, variants.fp32.name, fallback.reason)
    for name in candidates:
        variant, path = variants.for_backend(name)
        try:
            loaded = _load(name, path, variant, threads, engines, build_engines)
        except (BackendError, OSError) as exc:
            # OSError: e.g. a read-only bundle folder where engines cannot be cached.
            fallback = Fallback(name, str(exc))
            log.warning("not using %s for %s: %s", name, path.name, fallback.reason)
            fallbacks.append(fallback)
            continue
        loaded.fallbacks = fallbacks
        # The choice in one line; the reasons of the skipped backends are at DEBUG
        # above and in ``describe()``, which ``cytoedge doctor`` shows.
        skipped = f" (skipped {', '.join(f.backend for f in fallbacks)})" if fallbacks else ""
        log.info("%s runs on %s (%s)%s", path.name, loaded.name, loaded.variant, skipped)
        return loaded
    reasons = "; ".join(str(f) for f in fallbacks)
    if backend != "auto":
        raise BackendError(
            f"configured backend {backend} cannot run {variants.fp32.name}: {reasons}"
        )
    raise BackendError(f"no backend can run {variants.fp32.name}: {reasons}")


def _load(
    name: str, path: Path, variant: str, threads: int, engines: Path, build_engines: bool
) -> Backend:
    if name == "tensorrt":
        from runtime.backends.trt import TensorrtBackend
        from runtime.engines import ensure_engine

        engine = ensure_engine(path, engines, build=build_engines)
        return TensorrtBackend(path, engine)
    from runtime.backends.ort import OrtBackend

    if name == "ort-tensorrt":
        options, max_batch = _ort_tensorrt_options(path, engines)
        return OrtBackend(
            name, path, "fp16", threads=threads, provider_options=options, max_batch=max_batch
        )
    return OrtBackend(name, path, variant, threads=threads)


def _ort_tensorrt_options(path: Path, engines: Path) -> tuple[dict[str, object], int]:
    """TensorRT provider options: fp16, accurate LayerNorm, profiles, a per-GPU cache.

    ORT keeps its own engine cache; it lives under a folder named by the same key
    as our engines (ONNX hash, GPU, compute capability, TensorRT version), so an
    engine from another GPU or version is never offered to it.
    """
    import hashlib
    import json

    import onnxruntime as ort

    from runtime.engines import BATCH_PROFILES, DEFAULT_PROFILE, engine_key

    key = engine_key(path)
    digest = hashlib.sha256(json.dumps(key.to_json(), sort_keys=True).encode()).hexdigest()
    cache = engines / "ort-tensorrt" / digest[:16]
    cache.mkdir(parents=True, exist_ok=True)
    # An unoptimised CPU session only reads the graph: the input names and shapes.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reader = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    max_batch = 0
    for tensor in reader.get_inputs():
        dims = list(tensor.shape)
        if not all(isinstance(d, int) for d in dims[1:]):
            # Without fixed sizes there is no profile to give; the provider would
            # rebuild its engine for every new shape.
            raise BackendError(
                f"{path.name}: input {tensor.name} {dims} has dynamic axes besides the first"
            )
        profile = BATCH_PROFILES.get(tensor.name, DEFAULT_PROFILE)
        max_batch = max(max_batch, profile[2])
        for label, first in zip(("min", "opt", "max"), profile, strict=True):
            shapes[label].append(f"{tensor.name}:" + "x".join(str(d) for d in [first, *dims[1:]]))
    provider_options: dict[str, object] = {
        "trt_fp16_enable": True,
        "trt_layer_norm_fp32_fallback": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": ",".join(shapes["min"]),
        "trt_profile_opt_shapes": ",".join(shapes["opt"]),
        "trt_profile_max_shapes": ",".join(shapes["max"]),
    }
    return provider_options, max_batch
