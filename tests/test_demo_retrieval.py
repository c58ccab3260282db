"""Retrieval by patient embedding on the synthetic cohort's hidden marker beats chance.

The demo's networks with seeded weights: its encoder's architecture cut to 2 blocks
(for the suite's time) and GenBloom's aggregator at that width, read from a GenBloom-V
file by the export's strict loader, as the demo bundle builds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cytoedge_demo.builder import demo_encoder
from cytoedge_demo.genbloom import seeded_patient_encoder, write_genbloom_v
from cytoedge_demo.retrieval import chance_at_k, measure_retrieval, precision_at_k
from export.cell_images import normalise
from export.patient_encoder import load_patient_encoder


def test_precision_at_k_and_chance_count_what_they_say() -> None:
    labels = np.array([True, True, True, False, False, False])
    perfect = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3) + np.arange(6)[:, None] * 1e-3
    assert precision_at_k(perfect, labels, 2) == 1.0
    assert precision_at_k(perfect, labels, 5) == pytest.approx(2 / 5)  # only 2 others alike
    assert chance_at_k(labels) == pytest.approx(2 / 5)
    assert precision_at_k(perfect[:, ::-1], ~labels, 2) == 1.0


def test_retrieval_of_the_hidden_marker_beats_chance(tmp_path: Path) -> None:
    encoder = demo_encoder("vit_small", seed=20261127, depth=2)
    checkpoint = write_genbloom_v(seeded_patient_encoder(384, 384, seed=3), tmp_path / "v.pth")
    patient = load_patient_encoder(checkpoint, "genbloom-v", 384, width=384)

    def embed_cells(crops: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(normalise(crops))).numpy()

    def embed_patient(cells: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return patient(torch.from_numpy(cells)).numpy()

    found = measure_retrieval(embed_cells, embed_patient, patients=24, cells=12, k=5)
    assert found.chance == pytest.approx(11 / 23)
    assert found.precision > found.chance + 0.1, found
