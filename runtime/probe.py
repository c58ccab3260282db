"""What inference backends and GPUs this machine has, with the reason for each gap."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str


def _version_of(module_name: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # any import failure means "not usable here"
        return None
    return getattr(module, "__version__", "unknown version")


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs the driver reports; empty when none is visible."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        try:
            out = subprocess.run(
                [nvidia_smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (subprocess.SubprocessError, OSError):
            return []
    proc = Path("/proc/driver/nvidia/gpus")
    return [p.name for p in proc.iterdir()] if proc.is_dir() else []


def probe_backends() -> list[BackendStatus]:
    """Each backend in the order the automatic choice tries them."""
    gpus = gpu_names()
    gpu_note = "" if gpus else "; no GPU visible"
    statuses = []
    trt = _version_of("tensorrt")
    statuses.append(
        BackendStatus(
            "tensorrt",
            trt is not None and bool(gpus),
            f"TensorRT {trt}{gpu_note}" if trt else "tensorrt is not installed",
        )
    )
    ort = _version_of("onnxruntime")
    providers: list[str] = []
    if ort is not None:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    for name, provider in (
        ("ort-tensorrt", "TensorrtExecutionProvider"),
        ("ort-cuda", "CUDAExecutionProvider"),
        ("ort-cpu", "CPUExecutionProvider"),
    ):
        if ort is None:
            statuses.append(BackendStatus(name, False, "onnxruntime is not installed"))
        elif provider not in providers:
            statuses.append(BackendStatus(name, False, f"onnxruntime {ort} has no {provider}"))
        else:
            needs_gpu = provider != "CPUExecutionProvider"
            statuses.append(
                BackendStatus(
                    name,
                    not needs_gpu or bool(gpus),
                    f"onnxruntime {ort}, {provider}" + (gpu_note if needs_gpu else ""),
                )
            )
    return statuses
