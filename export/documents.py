"""The ``export.json`` an export folder carries for ``cytoedge export bundle`` (docs/DESIGN.md).

``{"kind", "section", "parity": {file: {"passed", ...numbers}}, "provenance", "extra_files"}``
where ``section`` is the model's bundle.json section with paths relative to the folder.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from export.onnx_export import OPSET, ParityReport
from runtime.files import write_json_atomic

EXPORT_FILE = "export.json"
# METHOD.md A: high risk = del(17p) and/or t(4;14); METHOD.md B: six malignant classes.
HIGH_RISK_TASKS = ("del(17p)", "t(4;14)")
BENIGN_CLASSES = ("reactive changes", "healthy")


def parity_entry(report: ParityReport) -> dict[str, Any]:
    return {"passed": report.passed, **report.metrics, "limits": report.limits}


def exporter_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "timm", "onnx", "onnxruntime", "onnxconverter-common"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {**versions, "opset": str(OPSET)}


def write_document(folder: Path, document: dict[str, Any]) -> Path:
    """Write ``export.json`` atomically (temporary name, then rename)."""
    path = Path(folder) / EXPORT_FILE
    write_json_atomic(path, document)
    return path


def default_head_section_fields(
    kind: str, outputs: tuple[str, ...], thresholds: dict[str, float]
) -> tuple[dict[str, Any], list[str]]:
    """Thresholds and risk groupings a head section needs; notes say what was defaulted."""
    notes = []
    if kind == "gated_attention_mil":
        missing = [task for task in outputs if task not in thresholds]
        if missing:
            notes.append(f"thresholds defaulted to 0.5 for {missing} (checkpoint had none)")
        return {
            "tasks": list(outputs),
            "thresholds": {task: thresholds.get(task, 0.5) for task in outputs},
            "high_risk": [task for task in HIGH_RISK_TASKS if task in outputs],
        }, notes
    malignant = [c for c in outputs if c not in BENIGN_CLASSES]
    if "malignancy" not in thresholds:
        notes.append("malignancy threshold defaulted to 0.5 (checkpoint had none)")
    return {
        "classes": list(outputs),
        "malignant_classes": malignant,
        "thresholds": {"malignancy": thresholds.get("malignancy", 0.5)},
    }, notes
