"""Retrieval by patient embedding on the synthetic cohort's hidden marker, against chance.

A cohort of synthetic myeloma patients, each a bag of plasma-cell crops drawn by the
demo's generator: on a positive patient the clone (``synthetic.CLONE_FRACTION`` of its
plasma cells) carries the marker's morphology (``synthetic.clone_morphology``), as on
the demo's smears, and every patient has a stain look of its own, as every smear
does. The cells go through the bundle's encoder, each bag through its patient
encoder; for each patient the ``k`` others nearest by cosine are compared with its
marker status (precision@k). Chance is the share of the other patients with the same
status, averaged over the patients: what k drawn at random would give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cytoedge_demo.synthetic import CLONE_FRACTION, clone_morphology
from export.probe_cells import single_cell
from runtime.labels import MYELOMA_MARKERS

CROP_PX = 128  # a cell's crop at 0.25 um/px, as the pipeline cuts it (cells.patch_px)


@dataclass(frozen=True)
class Retrieval:
    marker: str
    patients: int
    cells: int
    k: int
    precision: float
    chance: float


def marker_bags(
    patients: int, cells: int, marker: str, seed: int, size: int = 224
) -> tuple[list[np.ndarray], np.ndarray]:
    """(bags of uint8 (cells, size, size, 3) plasma-cell crops, marker status per patient);
    every other patient is positive."""
    labels = np.arange(patients) % 2 == 0
    bags = []
    for patient, positive in enumerate(labels):
        status = {name: bool(positive) and name == marker for name in MYELOMA_MARKERS}
        rng = np.random.default_rng([seed, patient])
        crops = np.empty((cells, size, size, 3), np.uint8)
        for index in range(cells):
            affected = bool(positive) and rng.random() < CLONE_FRACTION
            crop = single_cell(
                rng,
                "plasma",
                CROP_PX,
                seed=seed * 7919 + patient,  # one stain look per patient
                change=(lambda shape, status=status: clone_morphology(shape, status))
                if affected
                else None,
            )
            resized = Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)
            crops[index] = np.asarray(resized)
        bags.append(crops)
    return bags, labels


def precision_at_k(embeddings: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean share of each row's ``k`` nearest other rows (cosine) with its label."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return float((labels[nearest] == labels[:, None]).mean())


def chance_at_k(labels: np.ndarray) -> float:
    """The expected precision of ``k`` other patients drawn at random (any k)."""
    same = [(labels == label).sum() - 1 for label in labels]
    return float(np.mean(same) / (len(labels) - 1))


def measure_retrieval(
    embed_cells: Callable[[np.ndarray], np.ndarray],
    embed_patient: Callable[[np.ndarray], np.ndarray],
    *,
    marker: str = "del(17p)",
    patients: int = 24,
    cells: int = 12,
    k: int = 5,
    seed: int = 2026,
    size: int = 224,
) -> Retrieval:
    """precision@k of the patient embeddings for ``marker``, and chance."""
    bags, labels = marker_bags(patients, cells, marker, seed, size)
    embeddings = np.stack([embed_patient(embed_cells(bag)).reshape(-1) for bag in bags])
    return Retrieval(
        marker, patients, cells, k, precision_at_k(embeddings, labels, k), chance_at_k(labels)
    )


def demo_networks(
    bundle_path: str | None,
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], str]:
    """(embed cells, embed a bag, which networks): a bundle's encoder and patient encoder
    through the runtime, or without one the demo bundle's networks rebuilt from their
    seeds in torch (what ``cytoedge demo`` exports, before its parity gates)."""
    if bundle_path is not None:
        from runtime.bundle_format import load_bundle
        from runtime.encoder import Encoder
        from runtime.patient import PatientEncoder

        bundle = load_bundle(bundle_path)
        encoder, patient = Encoder(bundle), PatientEncoder(bundle)
        return encoder.embed, patient.embed, f"bundle {bundle.name} {bundle.version} (runtime)"
    import torch

    from cytoedge_demo.builder import DemoRecipe, demo_encoder
    from cytoedge_demo.genbloom import seeded_patient_encoder
    from export.cell_images import normalise

    recipe = DemoRecipe()
    cells_model = demo_encoder(recipe.encoder_arch, recipe.seed)
    width = int(cells_model.embed_dim)
    bag_model = seeded_patient_encoder(width, width, recipe.seed + 7)

    def embed_cells(crops: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return cells_model(torch.from_numpy(normalise(crops))).numpy()

    def embed_bag(cells: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return bag_model(torch.from_numpy(cells)).numpy()

    return embed_cells, embed_bag, f"the demo's seeded {recipe.encoder_arch} and GenBloom-V (torch)"
