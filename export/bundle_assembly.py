"""``cytoedge export bundle``: assemble a bundle from the export commands' folders.

Each folder holds ONNX files and ``export.json`` (see docs/DESIGN.md, "What the
export commands leave"); a segmenter folder may instead hold the
``segmenter.json`` that ``export segmenter`` writes. No torch here: the files
are already exported and gated; this checks the gates' reports, places the
files at their bundle paths and calls ``runtime.bundle_format.write_bundle``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.bundle_format import (
    Bundle,
    CellsSpec,
    EncoderSpec,
    HeadSpec,
    PatientEncoderSpec,
    QcSpec,
    SegmenterSpec,
    StainReference,
    write_bundle,
)
from runtime.typed_json import SpecError, parse_section

EXPORT_FILE = "export.json"
SEGMENTER_FILE = "segmenter.json"
SECTION_TYPES: dict[str, type] = {
    "encoder": EncoderSpec,
    "head": HeadSpec,
    "segmenter": SegmenterSpec,
    "patient_encoder": PatientEncoderSpec,
}
# What --sections may hold: the parts of bundle.json no export command writes.
SECTION_KEYS = {"stain_reference": StainReference, "qc": QcSpec, "cells": CellsSpec}


class AssemblyError(ValueError):
    """An export folder that cannot go into a bundle; the message is one line."""


@dataclass(frozen=True)
class ExportedModel:
    folder: Path
    kind: str
    section: Any  # EncoderSpec | HeadSpec | SegmenterSpec, paths relative to ``folder``
    provenance: dict[str, Any]
    parity: dict[str, Any]
    extra_files: tuple[str, ...]  # e.g. external weight data that must sit beside its ONNX


def read_export(folder: Path, kind: str) -> ExportedModel:
    """Read and check one export folder: its section, and a passed gate per model file."""
    folder = Path(folder)
    document, source = _document(folder, kind)
    if document.get("kind") != kind:
        raise AssemblyError(f"{source}: kind is {document.get('kind')!r}, expected {kind!r}")
    try:
        section = parse_section(SECTION_TYPES[kind], document.get("section"), kind)
    except SpecError as exc:
        raise AssemblyError(f"{source}: {exc}") from None
    parity = document.get("parity")
    if not isinstance(parity, dict):
        raise AssemblyError(f"{source}: no parity reports")
    for relative in _model_files(section):
        report = parity.get(relative)
        if not isinstance(report, dict):
            raise AssemblyError(f"{source}: {relative} has no parity report; export it again")
        if report.get("passed") is not True:
            numbers = ", ".join(f"{k}={v}" for k, v in report.items() if k != "passed")
            raise AssemblyError(f"{source}: {relative} failed its parity gate ({numbers})")
    extra = tuple(str(f) for f in document.get("extra_files", []))
    for relative in (*_model_files(section), *extra):
        if not (folder / relative).is_file():
            raise AssemblyError(f"{source}: {relative} is missing from {folder}")
    provenance = document.get("provenance", {})
    return ExportedModel(folder, kind, section, dict(provenance), parity, extra)


def _document(folder: Path, kind: str) -> tuple[dict[str, Any], Path]:
    path = folder / EXPORT_FILE
    if kind == "segmenter" and not path.is_file() and (folder / SEGMENTER_FILE).is_file():
        return _segmenter_document(folder / SEGMENTER_FILE), folder / SEGMENTER_FILE
    if not path.is_file():
        command = {"head": "heads", "patient_encoder": "patient-encoder"}.get(kind, kind)
        raise AssemblyError(f"{folder}: no {EXPORT_FILE}; run `cytoedge export {command}` into it")
    return _load_json(path), path


def _segmenter_document(path: Path) -> dict[str, Any]:
    """``export segmenter`` writes its section and gate numbers as {segmenter, provenance}."""
    raw = _load_json(path)
    section = raw.get("segmenter")
    provenance = raw.get("provenance", {})
    diffs = provenance.get("parity_max_abs_diff")
    tolerances = provenance.get("parity_tolerance")
    report: dict[str, Any] = {"passed": False}
    if isinstance(diffs, dict) and isinstance(tolerances, dict) and tolerances:
        report = {
            "passed": all(
                name in diffs and diffs[name] <= limit for name, limit in tolerances.items()
            ),
            "max_abs_diff": diffs,
            "tolerance": tolerances,
        }
    file = section.get("file") if isinstance(section, dict) else None
    return {
        "kind": "segmenter",
        "section": section,
        "parity": {file: report},
        "provenance": provenance,
    }


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AssemblyError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise AssemblyError(f"{path}: must hold a JSON object")
    return data


def _model_files(section: Any) -> list[str]:
    if isinstance(section, EncoderSpec | PatientEncoderSpec):
        return list(section.variants.values())
    if isinstance(section, HeadSpec):
        return list(section.files)
    return [section.file, *section.variants.values()]


def _place(relative: str, prefix: str) -> str:
    """Bundle path of a file: its name under ``prefix`` (encoder and segmenter at the top)."""
    return (
        str(PurePosixPath(prefix, PurePosixPath(relative).name))
        if prefix
        else (PurePosixPath(relative).name)
    )


def assemble_bundle(
    destination: Path,
    *,
    encoder_dir: Path,
    head_dirs: Sequence[Path],
    segmenter_dir: Path | None,
    name: str,
    version: str,
    intended_use: str,
    sections_file: Path | None = None,
    patient_encoder_dir: Path | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Check every export folder's gates, then write the bundle with runtime.bundle_format.

    Without heads the bundle holds the networks that make embeddings: the version
    ``cytoedge train`` starts from (docs/training.md); it scores nothing.
    """
    parts = [read_export(encoder_dir, "encoder")]
    parts += [read_export(folder, "head") for folder in head_dirs]
    if segmenter_dir is not None:
        parts.append(read_export(segmenter_dir, "segmenter"))
    if patient_encoder_dir is not None:
        parts.append(read_export(patient_encoder_dir, "patient_encoder"))
    sources: dict[str, Path] = {}
    placed: dict[str, Any] = {}
    heads: list[HeadSpec] = []
    provenance: dict[str, Any] = {"heads": {}}
    for part in parts:
        prefix = "heads" if part.kind == "head" else ""
        for relative in (*_model_files(part.section), *part.extra_files):
            target = _place(relative, prefix)
            if target in sources:
                raise AssemblyError(f"{part.folder}: {target} is already taken by another model")
            sources[target] = part.folder / relative
        section = _relocated(part.section, prefix)
        record = {**part.provenance, "parity": part.parity}
        if part.kind == "head":
            heads.append(section)
            provenance["heads"][section.name] = record
        else:
            placed[part.kind] = section
            provenance[part.kind] = record
    extra_sections = _read_sections(sections_file) if sections_file else {}
    provenance.update(extra_sections.pop("provenance", {}))
    return write_bundle(
        destination,
        name=name,
        version=version,
        intended_use=intended_use,
        sources=sources,
        encoder=placed["encoder"],
        heads=heads,
        segmenter=placed.get("segmenter"),
        patient_encoder=placed.get("patient_encoder"),
        provenance=provenance,
        overwrite=overwrite,
        **extra_sections,
    )


def _relocated(section: Any, prefix: str) -> Any:
    if isinstance(section, EncoderSpec | PatientEncoderSpec):
        variants = {k: _place(v, prefix) for k, v in section.variants.items()}
        return replace(section, variants=variants)
    if isinstance(section, HeadSpec):
        return replace(section, files=tuple(_place(f, prefix) for f in section.files))
    variants = {k: _place(v, prefix) for k, v in section.variants.items()}
    return replace(section, file=_place(section.file, prefix), variants=variants)


def _read_sections(path: Path) -> dict[str, Any]:
    """stain_reference, qc, cells (typed) and provenance (free form) from a JSON file."""
    raw = _load_json(path)
    unknown = sorted(set(raw) - set(SECTION_KEYS) - {"provenance"})
    if unknown:
        raise AssemblyError(
            f"{path}: unknown section(s) {', '.join(unknown)} "
            f"(allowed: {', '.join([*SECTION_KEYS, 'provenance'])})"
        )
    sections: dict[str, Any] = {}
    for key, cls in SECTION_KEYS.items():
        if key in raw:
            try:
                sections[key] = parse_section(cls, raw[key], key)
            except SpecError as exc:
                raise AssemblyError(f"{path}: {exc}") from None
    if "provenance" in raw:
        if not isinstance(raw["provenance"], dict):
            raise AssemblyError(f"{path}: provenance must be an object")
        sections["provenance"] = raw["provenance"]
    return sections
