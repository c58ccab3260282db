"""The export gates' probe cells: drawn by export itself, and the same drawing as the demo's."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cytoedge_demo import synthetic
from export import probe_cells
from export.probe_cells import render_cell_patches


def test_render_cell_patches_gives_encoder_inputs() -> None:
    patches = render_cell_patches(4, seed=2)
    assert patches.shape == (4, 224, 224, 3) and patches.dtype == np.uint8
    np.testing.assert_array_equal(patches, render_cell_patches(4, seed=2))
    centre = patches[:, 92:132, 92:132].astype(float).mean()
    assert centre < patches.astype(float).mean() - 10
    Image.fromarray(patches[0])  # a valid RGB image


def test_other_sizes_and_seeds_give_other_cells() -> None:
    crops = render_cell_patches(4, seed=2, size=128)
    assert crops.shape == (4, 128, 128, 3)
    assert not np.array_equal(render_cell_patches(4, seed=3, size=128), crops)
    assert len({crop.tobytes() for crop in crops}) == 4  # one cell of each kind


def test_the_demo_draws_its_cells_with_the_probes_code() -> None:
    # One copy of the drawing: the smears and the single-cell folders use export's.
    for name in ("single_cell", "render_region", "draw_shape", "place_cell", "stain_look"):
        assert getattr(synthetic, name) is getattr(probe_cells, name), name
    assert not hasattr(synthetic, "render_cell_patches")
