"""A new version of a bundle: the same encoder, segmenter and slide parameters, new or
changed heads. ``cytoedge train`` (new case heads, a new cell head, or with
``--align-patient-encoder`` a new patient encoder) and ``cytoedge validate
--recalibrate`` (new thresholds) both write one; the version they start from is never
touched.

Versions sit side by side as ``<data_dir>/bundles/<name>-<version>/`` unless the
caller names another folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.bundle_format import (
    Bundle,
    BundleError,
    HeadSpec,
    PatientEncoderSpec,
    write_bundle,
)

_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")


def next_version(version: str) -> str:
    """The version after ``version``: its last number plus one (1.2.9 -> 1.2.10), or
    ``.1`` appended when it ends in none."""
    match = _TRAILING_NUMBER.match(version)
    if match is None:
        return f"{version}.1"
    return f"{match.group(1)}{int(match.group(2)) + 1}"


def version_folder(bundles_root: Path, name: str, version: str) -> Path:
    return bundles_root / f"{name}-{version}"


def write_bundle_version(
    base: Bundle,
    destination: Path,
    *,
    version: str,
    heads: Sequence[HeadSpec],
    head_files: Mapping[str, Path],
    provenance: Mapping[str, Any],
    intended_use: str | None = None,
    cell_head: HeadSpec | None = None,
    patient_encoder: tuple[PatientEncoderSpec, Mapping[str, Path]] | None = None,
) -> Bundle:
    """Write ``base`` with ``heads`` in place of its heads as ``version`` at ``destination``.

    ``head_files`` are the new heads' files by bundle path; a head that keeps its
    files (same paths as a head of ``base``) is copied from ``base``. ``cell_head``
    replaces the base's cell head (its files among ``head_files``); without it the
    base's is kept. ``patient_encoder`` (its section, its files by bundle path) replaces
    the base's patient encoder and every file of it. Refuses to write over an existing
    folder or to reuse ``base``'s version.
    """
    if version == base.version:
        raise BundleError(
            f"{base.name} {version} exists already; give the new version a new number"
        )
    if destination.exists():
        raise BundleError(f"{destination} exists; choose another version or folder")
    replaced = [base.cell_head] if cell_head is not None and base.cell_head is not None else []
    kept = {rel for head in [*base.heads, *replaced] for rel in head.files}
    sources: dict[str, Path] = {
        rel: base.file(rel) for rel in base.files if rel not in kept
    }  # encoder, segmenter and whatever else the base ships beside its heads
    if patient_encoder is not None:
        if base.patient_encoder is not None:
            for rel in base.patient_encoder.variants.values():
                sources.pop(rel, None)
        sources.update({rel: Path(path) for rel, path in patient_encoder[1].items()})
    for head in [*heads, *([cell_head] if cell_head is not None else [])]:
        for rel in head.files:
            if rel in head_files:
                sources[rel] = Path(head_files[rel])
            elif rel in kept:
                sources[rel] = base.file(rel)
            else:
                raise BundleError(f"head {head.name}: no file for {rel}")
    return write_bundle(
        destination,
        name=base.name,
        version=version,
        intended_use=intended_use or base.intended_use,
        sources=sources,
        encoder=base.encoder,
        heads=heads,
        segmenter=base.segmenter,
        cell_head=cell_head or base.cell_head,
        stain_reference=base.stain_reference,
        qc=base.qc,
        cells=base.cells,
        provenance=provenance,
        patient_encoder=patient_encoder[0] if patient_encoder else base.patient_encoder,
    )


def derived_from(base: Bundle) -> dict[str, str]:
    """The provenance entry that names the version a new one was made from."""
    return {"name": base.name, "version": base.version, "sha256": base.sha256}
