"""The bundle's patient encoder: a case's cell embeddings in, one patient embedding out.

The network (``features`` (cells, cell_dim) -> ``embedding`` (1, embed_dim), e.g.
GenBloom, export/patient_encoder.py) reads every kept cell of the case; a bag longer
than the section's ``max_cells`` is thinned evenly (every k-th cell, in bag order),
since attention costs the square of the cells. The embedding is returned L2-normalised:
the case index compares cases by cosine.
"""

from __future__ import annotations

import numpy as np

from runtime.backends import Backend, BackendError, RuntimeSettings, open_model
from runtime.bundle_format import Bundle, PatientEncoderSpec


def thinned(features: np.ndarray, max_cells: int) -> np.ndarray:
    """At most ``max_cells`` rows of ``features``, evenly spaced, first row kept."""
    if len(features) <= max_cells:
        return features
    rows = np.linspace(0, len(features) - 1, max_cells).round().astype(np.int64)
    return features[rows]


class PatientEncoder:
    """One session of the bundle's patient encoder: fp32, or the variant its backend
    prefers when the bundle has it (fp16 on ONNX Runtime's CUDA provider, int8 on a CPU)."""

    def __init__(self, bundle: Bundle, settings: RuntimeSettings | None = None) -> None:
        if bundle.patient_encoder is None:
            raise ValueError(f"bundle {bundle.name} {bundle.version} has no patient encoder")
        self.spec: PatientEncoderSpec = bundle.patient_encoder
        self.model: Backend = open_model(
            self.spec.model_variants(bundle.path), settings, engine_dir=bundle.engines_dir
        )
        names = {spec.name for spec in self.model.inputs}, {o.name for o in self.model.outputs}
        if names != ({"features"}, {"embedding"}):
            raise BackendError(
                f"{self.model.path.name}: a patient encoder needs input features and output "
                f"embedding; it has {sorted(names[0])} -> {sorted(names[1])}"
            )

    def embed(self, features: np.ndarray) -> np.ndarray:
        """(N, cell_dim) -> (embed_dim,) float32, unit length."""
        if features.ndim != 2 or features.shape[1] != self.spec.cell_dim or not len(features):
            raise ValueError(
                f"a patient encoder takes (N >= 1, {self.spec.cell_dim}) cells, got "
                f"{features.shape}"
            )
        bag = np.ascontiguousarray(thinned(features, self.spec.max_cells), dtype=np.float32)
        embedding = np.asarray(self.model.run({"features": bag})["embedding"], np.float32)
        embedding = embedding.reshape(-1)
        if embedding.shape != (self.spec.embed_dim,):
            raise BackendError(
                f"{self.model.path.name}: embedding of {embedding.shape}, bundle.json says "
                f"({self.spec.embed_dim},)"
            )
        norm = float(np.linalg.norm(embedding))
        return embedding / norm if norm > 0 else embedding

    @property
    def variant(self) -> str:
        return self.model.variant

    def close(self) -> None:
        self.model.close()
