"""A case's patient embedding, from every kept cell of its slides that passed QC.

The bundle's patient encoder (``runtime.patient``) reads the case's cells as a bag,
every class (within the case's cell budget), as GenBloom reads a patient's cells. The
record names the network, so the site's case index compares only embeddings of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from appliance.pipeline.bags import head_bag
from appliance.pipeline.slide_cache import SlideCells
from appliance.results.case_index import CaseIndex
from appliance.results.schema import PatientEmbeddingRecord
from runtime.backends import RuntimeSettings
from runtime.bundle_format import Bundle
from runtime.patient import PatientEncoder, thinned


def patient_encoder_sha256(bundle: Bundle) -> str:
    """The key of the bundle's patient encoder: its fp32 file's sha256."""
    assert bundle.patient_encoder is not None
    return bundle.files[bundle.patient_encoder.variants["fp32"]].sha256


def embed_patient(
    bundle: Bundle, kept: Mapping[str, SlideCells], settings: RuntimeSettings | None = None
) -> tuple[np.ndarray, PatientEmbeddingRecord] | None:
    """(unit-length embedding, its record); None without a patient encoder or cells."""
    spec = bundle.patient_encoder
    if spec is None:
        return None
    bag = head_bag(bundle, kept, ())
    if not len(bag):
        return None
    encoder = PatientEncoder(bundle, settings)
    try:
        embedding = encoder.embed(bag)
        variant = encoder.variant
    finally:
        encoder.close()
    record = PatientEmbeddingRecord(
        kind=spec.kind,
        output=spec.output,
        dim=spec.embed_dim,
        encoder_sha256=patient_encoder_sha256(bundle),
        cells=len(thinned(bag, spec.max_cells)),
        variant=variant,
    )
    return embedding, record


def site_case_index(bundle: Bundle, data_dir: Path, outbox: Path) -> CaseIndex | None:
    """The site's case index for the bundle's patient encoder (None without one), read,
    or rebuilt from the result folders in ``outbox`` when missing."""
    spec = bundle.patient_encoder
    if spec is None:
        return None
    return CaseIndex.open(data_dir, outbox, patient_encoder_sha256(bundle), spec.embed_dim)
