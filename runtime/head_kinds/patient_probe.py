"""A probe on the patient embedding (GenBloom's evaluation recipe): the myeloma markers as
independent sigmoids, called and calibrated as the gated-attention MIL head calls them,
but from the one vector the bundle's patient encoder gives a case instead of a bag of
cells. It suits sites with few cases: a linear layer (or one small hidden layer) has few
weights to learn.

The network takes ``features`` (1, E): the case's unit-length patient embedding
(``runtime.patient``), and gives only ``probabilities``; no cell carries attention.
It is tied to the patient encoder it learnt on (``patient_encoder_sha256``, its fp32
file): a bundle pairing it with another is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.head_kinds.gated_attention_mil import GatedAttentionMil, GatedMilParams
from runtime.typed_json import SpecError

if TYPE_CHECKING:
    from runtime.bundle_format import HeadSpec


@dataclass(frozen=True)
class PatientProbeParams(GatedMilParams):
    patient_encoder_sha256: str = ""


class PatientProbe(GatedAttentionMil):
    name = "patient_probe"
    params_type = PatientProbeParams
    model_outputs = frozenset({"probabilities"})
    reads = "patient"

    def check(self, spec: HeadSpec, params: PatientProbeParams, where: str) -> None:  # type: ignore[override]
        super().check(spec, params, where)
        if len(params.patient_encoder_sha256) != 64:
            raise SpecError(
                f"{where}.patient_encoder_sha256 must name the patient encoder it learnt on"
            )
        if spec.bag_classes:
            raise SpecError(f"{where}.bag_classes: a {self.name} head reads the patient embedding")
