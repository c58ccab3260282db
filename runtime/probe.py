"""What this machine has for the backends to probe: packages, GPUs, the CPU, cuda-python."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def package_version(module_name: str) -> str | None:
    """The version of an importable module, or None when it cannot be imported here."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # any import failure means "not usable here"
        return None
    return getattr(module, "__version__", "unknown version")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor"; "" when the driver does not say


def _nvidia_smi(fields: str) -> list[list[str]] | None:
    nvidia_smi = shutil.which("nvidia-smi")
    if not nvidia_smi:
        return None
    try:
        out = subprocess.run(
            [nvidia_smi, f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [[part.strip() for part in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_info() -> list[GpuInfo]:
    """Name and compute capability of each NVIDIA GPU nvidia-smi reports."""
    rows = _nvidia_smi("name,compute_cap")
    if rows is None:
        return []
    if not rows:  # drivers older than 510 have no compute_cap field
        rows = [[name] for name in gpu_names()]
    return [GpuInfo(row[0], row[1] if len(row) > 1 else "") for row in rows]


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs the driver reports; empty when none is visible."""
    rows = _nvidia_smi("name")
    if rows is not None:
        return [row[0] for row in rows]
    proc = Path("/proc/driver/nvidia/gpus")
    return [p.name for p in proc.iterdir()] if proc.is_dir() else []


def cuda_python_present() -> bool:
    """cuda-python's runtime bindings, which the TensorRT backend allocates memory with."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ImportError:  # the parent package "cuda" is absent
            continue
    return False


@dataclass(frozen=True)
class CpuInfo:
    model: str  # /proc/cpuinfo's "model name"; "" where the system does not say
    flags: tuple[str, ...]  # its instruction-set flags, sorted


def cpu_info() -> CpuInfo:
    """The CPU's model and flags (Linux): what decides which precision runs fastest, so
    compiled-model caches and measured choices are kept per CPU."""
    model, flags = "", ()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = tuple(sorted(set(value.split())))
    return CpuInfo(model, flags)
