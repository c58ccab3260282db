"""ONNX Runtime's TensorRT provider: fp32 ONNX with fp16 on, engines cached per GPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from runtime.backends.base import BackendError, ModelVariants, RuntimeSettings
from runtime.backends.ort import OrtBackend


class OrtTensorrtBackend(OrtBackend):
    name = "ort-tensorrt"
    priority = 20
    files = ("fp32",)  # the provider makes fp16 engines from the fp32 graph itself
    provider = "TensorrtExecutionProvider"

    @classmethod
    def load(
        cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path
    ) -> OrtTensorrtBackend:
        _, path = cls.choose_file(variants)
        options, max_batch = provider_options(path, engines)
        return cls(
            path, "fp16", threads=settings.threads, provider_options=options, max_batch=max_batch
        )


def provider_options(path: Path, engines: Path) -> tuple[dict[str, object], int]:
    """TensorRT provider options: fp16, accurate LayerNorm, profiles, a per-GPU cache.

    ORT keeps its own engine cache; it lives under a folder named by the same key
    as our engines (ONNX hash, GPU, compute capability, TensorRT version), so an
    engine from another GPU or version is never offered to it.
    """
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
