"""The fastest path per network on this machine, chosen by measurement.

Which backend and precision is fastest depends on the CPU (ONNX Runtime's int8
encoder on AVX2 and VNNI machines, OpenVINO at bf16 on AMX ones) and cannot be fixed
when a bundle is made. ``cytoedge doctor --self-test`` times the encoder and the
segmenter on every backend and precision that loads here, each held to its parity
gate against ONNX Runtime fp32 (``appliance.site.backend_check``); this module keeps
the fastest that passed, per network, in ``<data_dir>/state/measured-choice/<bundle
sha256[:16]>.json`` with its key (the bundle, the runtime packages' versions, the CPU's
model and flags, the GPUs). ``preferred_paths`` gives it to ``RuntimeSettings.prefer``
while the key holds; a path that failed its gate is never chosen, and with no record
(or a stale one) the automatic order stands as it was.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from runtime.bundle_format import Bundle
from runtime.files import write_json_atomic
from runtime.probe import cpu_info, gpu_names

RECORD_DIR = "measured-choice"
NETWORKS = ("encoder", "segmenter")
PACKAGES = ("cytoedge", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "cuda-python")


class Timed(Protocol):
    """One measured path (``backend_check.Measurement``)."""

    network: str
    backend: str
    variant: str
    passed: bool | None
    seconds_per_unit: float
    unit: str


@dataclass(frozen=True)
class Choice:
    """The path chosen for one network: its fp32 file's name is what open_model matches."""

    network: str
    file: str
    backend: str
    precision: str
    seconds_per_unit: float
    unit: str


def network_files(bundle: Bundle) -> dict[str, str]:
    """The fp32 file name of each network the choice covers."""
    files = {"encoder": Path(bundle.encoder.variants["fp32"]).name}
    if bundle.segmenter is not None:
        files["segmenter"] = Path(bundle.segmenter.file).name
    return files


def choose(bundle: Bundle, measurements: Iterable[Timed]) -> list[Choice]:
    """Per network, the fastest path that passed its gate (none where none passed)."""
    files = network_files(bundle)
    best: dict[str, Timed] = {}
    for row in measurements:
        if row.network not in files or row.passed is not True or row.seconds_per_unit <= 0:
            continue
        if row.network not in best or row.seconds_per_unit < best[row.network].seconds_per_unit:
            best[row.network] = row
    return [
        Choice(name, files[name], row.backend, row.variant, row.seconds_per_unit, row.unit)
        for name, row in best.items()
    ]


def package_versions() -> dict[str, str]:
    """The installed version of each package a measurement depends on ("" when absent)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def machine_key(bundle: Bundle) -> dict[str, Any]:
    """What a measured choice holds for: this bundle, these packages, this CPU and GPUs."""
    cpu = cpu_info()
    return {
        "bundle_sha256": bundle.sha256,
        "packages": package_versions(),
        "cpu": cpu.model,
        "cpu_flags": list(cpu.flags),
        "gpus": gpu_names(),
    }


def record_path(state_dir: Path, bundle: Bundle) -> Path:
    return state_dir / RECORD_DIR / f"{bundle.sha256[:16]}.json"


def write_choice(
    state_dir: Path, bundle: Bundle, choices: list[Choice], measurements: Iterable[Timed]
) -> Path:
    path = record_path(state_dir, bundle)
    write_json_atomic(
        path,
        {
            "key": machine_key(bundle),
            "created": time.time(),
            "choices": [asdict(choice) for choice in choices],
            "measurements": [
                {
                    "network": m.network,
                    "backend": m.backend,
                    "precision": m.variant,
                    "passed": m.passed,
                    "seconds_per_unit": m.seconds_per_unit,
                    "unit": m.unit,
                }
                for m in measurements
            ],
        },
    )
    return path


def recorded_choices(state_dir: Path, bundle: Bundle) -> list[Choice]:
    """The choices measured for this bundle on this machine as it is now; none when the
    record is missing, unreadable or was measured under another key."""
    record = _current_record(state_dir, bundle)
    try:
        return [Choice(**row) for row in record["choices"]] if record else []
    except (TypeError, KeyError):
        return []


def measurement_due(state_dir: Path, bundle: Bundle) -> bool:
    """No record holds for this bundle on this machine as it is now (a record whose
    networks all failed their gates holds: the fixed order, not a measurement per start)."""
    return _current_record(state_dir, bundle) is None


def _current_record(state_dir: Path, bundle: Bundle) -> dict[str, Any] | None:
    path = record_path(state_dir, bundle)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != machine_key(bundle):
        return None
    return record


def preferred_paths(state_dir: Path, bundle: Bundle) -> tuple[tuple[str, str, str], ...]:
    """``RuntimeSettings.prefer``: (fp32 file name, backend, precision) per chosen network."""
    return tuple(
        (choice.file, choice.backend, choice.precision)
        for choice in recorded_choices(state_dir, bundle)
    )
