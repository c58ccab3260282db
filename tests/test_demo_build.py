from __future__ import annotations

import numpy as np
import pytest

from cytoedge_demo.builder import DemoRecipe, train_demo_head


def _bags(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal((20, 8)).astype(np.float32) for _ in range(count)]


def test_head_training_refuses_when_many_slides_gave_no_cells() -> None:
    rng = np.random.default_rng(0)
    recipe = DemoRecipe(train_slides=10, val_slides=5, test_slides=5, head_epochs=1)
    kept = {"train": 6, "val": 4, "test": 4}  # 6 of 20 slides lost: a segmenter that failed
    bags = {split: _bags(n, rng) for split, n in kept.items()}
    labels = {split: (rng.random((n, 4)) < 0.5).astype(np.float32) for split, n in kept.items()}
    with pytest.raises(RuntimeError, match="6 of 20 synthetic slides gave no cells"):
        train_demo_head(bags, labels, recipe, lambda stage, fraction: None)
