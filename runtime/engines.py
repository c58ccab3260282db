"""TensorRT engines, built per GPU and cached beside the bundle in ``engines/``.

This module owns engine builds (the TensorRT builder needs no torch), so the
runtime can rebuild a stale engine itself and ``cytoedge export engines`` calls
the same ``ensure_engine`` before running its parity gate.

An engine ``engines/<model>.engine`` has a JSON sidecar ``<model>.engine.json``
holding its key: the ONNX file's sha256, the GPU's name and compute capability,
the TensorRT version, the precision and the optimisation profiles. An engine
whose sidecar is missing, unreadable or holds another key, or whose own bytes
no longer match the sidecar's hash, is stale or foreign: it is rebuilt, never
loaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.backends.base import BackendError
from runtime.backends.cuda import device_identity
from runtime.files import sha256_file, write_bytes_atomic

log = logging.getLogger(__name__)

# Optimisation profiles (min, opt, max) along the first axis, by ONNX input name:
# the encoder takes batches of cells, the heads take bags of cells.
BATCH_PROFILES: dict[str, tuple[int, int, int]] = {
    "pixels": (1, 64, 256),
    "crops": (1, 64, 256),
    "features": (1, 512, 20_000),
}
DEFAULT_PROFILE = (1, 64, 256)
WORKSPACE_BYTES = 4 << 30


class StaleEngineError(BackendError):
    """No current engine for this GPU and building was not allowed."""


class UnsupportedModelError(BackendError):
    """TensorRT cannot take this ONNX file (recorded, so it is not retried for the same key)."""


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    profiles: dict[str, list[int]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process: an engine
    key is asked for on every model load, and an ONNX file can be a gigabyte."""
    stat = path.stat()
    token = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if token not in _SHA_CACHE:
        _SHA_CACHE[token] = sha256_file(path)
    return _SHA_CACHE[token]


def tensorrt_version() -> str:
    try:
        return importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        import tensorrt

        return str(tensorrt.__version__)


def engine_key(onnx_path: Path, precision: str = "fp16") -> EngineKey:
    gpu_name, capability = device_identity()
    return EngineKey(
        onnx_sha256=file_sha256(onnx_path),
        gpu_name=gpu_name,
        compute_capability=capability,
        tensorrt_version=tensorrt_version(),
        precision=precision,
        profiles={name: list(p) for name, p in sorted(BATCH_PROFILES.items())}
        | {"*": list(DEFAULT_PROFILE)},
    )


def engine_path_for(onnx_path: Path, engines_dir: Path) -> Path:
    """``engines/<path of the ONNX below the bundle, '/' as '__'>.engine``."""
    try:
        relative = onnx_path.resolve().relative_to(engines_dir.resolve().parent)
        stem = "__".join(relative.with_suffix("").parts)
    except ValueError:
        stem = onnx_path.stem
    return engines_dir / f"{stem}.engine"


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def timing_cache_path(engines_dir: Path) -> Path:
    gpu_name, capability = device_identity()
    slug = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-").lower()
    return engines_dir / f"timing.{slug}.sm{capability}.trt{tensorrt_version()}.cache"


def stale_reason(engine_path: Path, key: EngineKey) -> str | None:
    """Why the cached engine cannot be used for ``key``; None when it is current."""
    if not engine_path.is_file():
        return "no engine built yet"
    sidecar = sidecar_path(engine_path)
    recorded = _read_sidecar(sidecar)
    if not recorded:
        return f"{sidecar.name} is missing or unreadable"
    wanted = key.to_json()
    for field_name, value in wanted.items():
        if recorded.get("key", {}).get(field_name) != value:
            return f"built for another {field_name.replace('_', ' ')}"
    if recorded.get("engine_sha256") != file_sha256(engine_path):
        return "engine file does not match its recorded sha256"
    return None


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def ensure_engine(onnx_path: Path, engines_dir: Path, *, build: bool = True) -> Path:
    """A current fp16 engine for ``onnx_path`` on this GPU, built when stale or missing."""
    key = engine_key(onnx_path)
    engine_path = engine_path_for(onnx_path, engines_dir)
    recorded = _read_sidecar(sidecar_path(engine_path))
    if recorded.get("key") == key.to_json() and "unsupported" in recorded:
        raise UnsupportedModelError(str(recorded["unsupported"]))
    reason = stale_reason(engine_path, key)
    if reason is None:
        return engine_path
    if not build:
        raise StaleEngineError(
            f"{engine_path.name}: {reason}; run `cytoedge export engines` to build it"
        )
    log.warning("building TensorRT engine %s (%s); this takes minutes", engine_path.name, reason)
    try:
        build_engine(onnx_path, engine_path, fp16=True, timing_cache=timing_cache_path(engines_dir))
    except UnsupportedModelError as exc:
        # The same file on the same GPU and TensorRT will fail the same way: say so once.
        engine_path.unlink(missing_ok=True)
        document = {"key": key.to_json(), "unsupported": str(exc)}
        write_bytes_atomic(sidecar_path(engine_path), json.dumps(document, indent=2).encode())
        raise
    write_bytes_atomic(
        sidecar_path(engine_path),
        json.dumps(
            {"key": key.to_json(), "engine_sha256": file_sha256(engine_path)}, indent=2
        ).encode(),
    )
    return engine_path


def build_engine(
    onnx_path: Path, engine_path: Path, *, fp16: bool = True, timing_cache: Path | None = None
) -> None:
    """Parse ONNX, build a serialized engine with the batch profiles, write it atomically.

    With fp16 on, normalisation and softmax layers are pinned to fp32 (they overflow
    or lose mass in fp16) and inputs are taken as fp16, halving the host-to-device
    copy; outputs stay fp32.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedModelError(f"{onnx_path.name}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise UnsupportedModelError(
                f"{onnx_path.name}: input {tensor.name} has dynamic axes besides the first "
                f"{shape}; only the batch / bag axis may be dynamic"
            )
        low, opt, high = BATCH_PROFILES.get(tensor.name, DEFAULT_PROFILE)
        rest = shape[1:]
        profile.set_shape(tensor.name, (low, *rest), (opt, *rest), (high, *rest))
        if fp16 and tensor.dtype == trt.float32:
            tensor.dtype = trt.float16
    config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        accurate = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type in accurate:
                layer.precision = trt.float32
                for output in range(layer.num_outputs):
                    layer.set_output_type(output, trt.float32)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{onnx_path.name}: TensorRT engine build failed (see the log)")
    write_bytes_atomic(engine_path, bytes(serialized))
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
