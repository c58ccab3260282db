"""Shared test models for segmentation: an exact "oracle" network and one trained StarDist.

The oracle turns an image into the targets StarDist is trained to predict
(probability = normalised distance to the background, distances along the
rays) for dark discs on a bright background. It lets the post-processing be
tested exactly, without TensorFlow.

``trained_stardist()`` trains the small demo network (TensorFlow: 240 steps, about
2-4 minutes on 2 cores) and exports it once, into a folder of the system temp dir
named by the sources that shape it and guarded by a file lock, so the segmentation
tests, the export tests and the tiny bundle (tests/fixtures/tiny_bundle.py) share
one training per machine, not one each per run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.draw import disk

from tests.fixtures.keyed_cache import keyed_cache

GLASS = (226, 223, 228)
N_RAYS = 32
GRID = (2, 2)
# Enough to pass F1 >= 0.9 at IoU 0.5 on held-out synthetic tiles (tests/test_segmentation.py).
TEST_RECIPE = {
    "n_tiles": 40,  # at 24 the model missed a third of the lymphocytes (F1 0.87)
    "epochs": 6,
    "steps_per_epoch": 40,
    "seed": 1,
    "nms_threshs": (0.3,),
}


class OracleNetwork:
    """prob and dist targets of the dark objects in the (normalised) input."""

    def __init__(self, n_rays: int = N_RAYS, grid: tuple[int, int] = GRID) -> None:
        self.n_rays, self.grid = n_rays, grid
        self.calls: list[tuple[int, ...]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from stardist.geometry import star_dist
        from stardist.utils import edt_prob

        x = feeds["input"]
        self.calls.append(x.shape)
        labels, _ = ndimage.label(x[0].mean(axis=-1) < 0.5)
        gy, gx = self.grid
        prob = edt_prob(labels)[::gy, ::gx]
        dist = star_dist(labels, self.n_rays, grid=self.grid)
        return {"prob": prob[None, ..., None].astype(np.float32), "dist": dist[None]}


def oracle_section(prob_thresh: float = 0.5, nms_thresh: float = 0.4) -> dict[str, Any]:
    return {
        "file": "segmenter.onnx",
        "n_rays": N_RAYS,
        "grid": list(GRID),
        "div_by": [8, 8],
        "prob_thresh": prob_thresh,
        "nms_thresh": nms_thresh,
        "input_channels": 3,
        "normalisation": {"kind": "scale", "factor": 1 / 255},
    }


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """Glass with dark discs: the oracle's ground truth is exactly these discs."""
    image = np.empty((*shape, 3), np.uint8)
    image[:] = GLASS
    for centre in centres:
        rr, cc = disk(centre, radius, shape=shape)
        image[rr, cc] = (90, 40, 130)
    return image


ROOT = Path(__file__).resolve().parents[1]
# What the trained network depends on: a change to any of these trains it again.
SOURCES = (
    "export/segmenter.py",
    "appliance/pipeline/segmentation.py",
    "demo/cytoedge_demo/synthetic.py",
    "export/probe_cells.py",
    "tests/segmenter_model.py",
)


def cache_key() -> str:
    digest = hashlib.sha256()
    for relative in SOURCES:
        digest.update(relative.encode())
        digest.update((ROOT / relative).read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def trained_stardist() -> tuple[Path, Path, dict[str, Any]]:
    """(StarDist model folder, export folder, bundle section) of the shared test model."""
    from cytoedge_demo.synthetic import segmentation_tiles
    from export.segmenter import TrainingRecipe, export_segmenter, train_segmenter

    with keyed_cache("cytoedge-test-stardist", cache_key()) as root:
        model_dir, onnx_dir = root / "model", root / "onnx"
        if not (onnx_dir / "segmenter.json").is_file():
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(onnx_dir, ignore_errors=True)
            train_segmenter(model_dir, segmentation_tiles, TrainingRecipe(**TEST_RECIPE), threads=2)
            export_segmenter(model_dir, onnx_dir, threads=2)
    document = json.loads((onnx_dir / "segmenter.json").read_text(encoding="utf-8"))
    return model_dir, onnx_dir, document["segmenter"]


def tensorflow_available() -> bool:
    # find_spec, not import: loading TensorFlow at collection costs seconds.
    return all(importlib.util.find_spec(name) for name in ("tensorflow", "tf2onnx"))
