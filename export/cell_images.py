"""Cell-like encoder inputs for parity and quantisation gates.

Random noise is a poor probe of a ViT: fidelity must be judged on inputs that look like what
the encoder will see. The images are rendered nucleated cells
(``export.probe_cells.render_cell_patches``: crops made as the pipeline makes them);
this module only normalises them as the encoder's ``pixels`` input.
"""

from __future__ import annotations

import numpy as np

from export.encoder import IMAGE_SIZE, MEAN, STD
from export.probe_cells import render_cell_patches
from runtime.bundle_format import InputSpec
from runtime.encoder import encoder_feeds


def normalise(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW with DinoBloom's mean / std (the encoder's ``pixels``)."""
    return encoder_feeds(InputSpec(IMAGE_SIZE, MEAN, STD), images_uint8)["pixels"]


def cell_pixels(count: int, seed: int = 0) -> np.ndarray:
    """Normalised cell-like encoder inputs, float32 (count, 3, 224, 224); the same per seed."""
    return normalise(render_cell_patches(count, seed, IMAGE_SIZE))
