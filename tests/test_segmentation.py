"""Segmentation on tiles: padding, NMS, seams, matching, and the ONNX path against StarDist."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk

from appliance.pipeline.segmentation import (
    DEFAULT_NORMALISATION,
    MatchCounts,
    SegmentationError,
    Segmenter,
    match_instances,
    network_input,
    normalise,
    segmenter_spec,
)
from runtime.backends import RuntimeSettings
from runtime.bundle_format import SegmenterSpec
from tests.segmenter_model import (
    OracleNetwork,
    discs,
    oracle_section,
    tensorflow_available,
    trained_stardist,
)

ROOT = Path(__file__).resolve().parents[1]
# Held-out synthetic tiles: seeds the training tiles never use (training: seed * 1000 + i).
HELD_OUT_SEED = 777
# The target is F1 >= 0.9 at IoU 0.5, a benchmark figure (cytoedge bench segmentation,
# docs/BENCHMARKS.md). Training the small test network ends a little differently on each
# CPU's kernels (0.924 seen on Zen 1, 0.897 on Zen 4), so the test holds a floor with a
# margin: it still fails a segmenter that misses or invents one cell in seven.
F1_FLOOR = 0.85


def oracle_segmenter() -> Segmenter:
    return Segmenter(OracleNetwork(), segmenter_spec(oracle_section()))


def test_every_disc_is_found_once_with_its_shape() -> None:
    centres = [(40, 40), (40, 120), (110, 70), (150, 160)]
    # An odd-sized tile: padded to a multiple of div_by for the network, cropped back.
    image = discs((187, 203), centres, 18)
    segmenter = oracle_segmenter()
    labels, found = segmenter.segment(image)
    assert segmenter.network.calls == [(1, 192, 208, 3)]
    assert len(found) == len(centres)
    assert labels.shape == image.shape[:2]
    truth = np.zeros(image.shape[:2], np.int32)
    for index, centre in enumerate(centres, 1):
        truth[disk(centre, 18, shape=truth.shape)] = index
    assert match_instances(truth, labels, 0.8) == MatchCounts(4, 0, 0)
    polygons = found.polygons()
    assert polygons.shape == (4, 32, 2)
    radii = np.hypot(*(polygons - found.points[:, None, :]).transpose(2, 0, 1))
    assert radii.mean() == pytest.approx(18, abs=1.5)


def test_a_cell_on_a_seam_is_counted_once() -> None:
    # Two tiles side by side, cores split at column 224, each read with a 64 px margin.
    margin, seam, width, height = 64, 224, 448, 256
    centres = [(60, 60), (180, 130), (128, seam), (70, seam + 3), (200, 330), (60, 400)]
    slide = discs((height, width), centres, 20)
    segmenter = oracle_segmenter()
    tiles = [  # (first column of the tile image, core columns in tile coordinates)
        (0, (0, seam)),
        (seam - margin, (margin, margin + width - seam)),
    ]
    kept, everything = [], []
    for start, (c0, c1) in tiles:
        tile = slide[:, start : start + (seam + margin if start == 0 else width - start)]
        found = segmenter.detect(tile, core=(0, c0, height, c1))
        kept.extend((p[0], p[1] + start) for p in found.points)
        everything.extend((p[0], p[1] + start) for p in segmenter.detect(tile).points)
    assert len(kept) == len(centres)
    for centre in centres:
        near = [p for p in kept if np.hypot(p[0] - centre[0], p[1] - centre[1]) < 6]
        assert len(near) == 1, (centre, kept)
    # Without the core rule the two cells on the seam would be counted twice.
    assert len(everything) == len(centres) + 2


def test_empty_and_blank_tiles_give_no_objects() -> None:
    segmenter = oracle_segmenter()
    labels, found = segmenter.segment(discs((64, 64), [], 10))
    assert len(found) == 0 and not labels.any()
    assert found.polygons().shape == (0, 32, 2)


def test_normalisation_matches_csbdeep_percentiles() -> None:
    from csbdeep.utils import normalize

    image = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    ours = normalise(image, DEFAULT_NORMALISATION)
    np.testing.assert_allclose(ours, normalize(image, 1, 99.8), rtol=1e-5, atol=1e-6)
    assert normalise(image, {"kind": "scale", "factor": 0.5}).max() == pytest.approx(127.5)
    with pytest.raises(SegmentationError, match="normalisation"):
        normalise(image, {"kind": "zscore"})


def test_bad_sections_and_inputs_are_refused() -> None:
    section = oracle_section()
    with pytest.raises(SegmentationError, match="n_rays"):
        segmenter_spec({k: v for k, v in section.items() if k != "n_rays"})
    with pytest.raises(SegmentationError, match="multiple"):
        segmenter_spec({**section, "div_by": [9, 8]})
    with pytest.raises(SegmentationError, match="input_channels"):
        segmenter_spec({**section, "input_channels": 2})
    with pytest.raises(SegmentationError, match="normalisation"):
        segmenter_spec({**section, "normalisation": {"kind": "zscore"}})
    # The bundle's own section object is checked the same way.
    spec = segmenter_spec(section)
    assert isinstance(spec, SegmenterSpec) and segmenter_spec(spec) == spec
    with pytest.raises(SegmentationError, match="n_rays"):
        segmenter_spec(dataclasses.replace(spec, n_rays=2))
    # No normalisation in the section: the default (percentile 1 / 99.8).
    bare = {k: v for k, v in section.items() if k != "normalisation"}
    assert segmenter_spec(bare).normalisation == DEFAULT_NORMALISATION
    with pytest.raises(SegmentationError, match="RGB"):
        network_input(np.zeros((10, 10), np.uint8), segmenter_spec(section))


def test_matching_counts_one_to_one_pairs() -> None:
    truth = np.zeros((40, 40), np.int32)
    truth[2:12, 2:12] = 1
    truth[20:30, 20:30] = 2
    truth[2:6, 30:34] = 3
    predicted = np.zeros_like(truth)
    predicted[3:13, 2:12] = 5  # IoU 0.82 with 1
    predicted[20:30, 26:36] = 7  # IoU 0.25 with 2: no match
    counts = match_instances(truth, predicted)
    assert counts == MatchCounts(1, 1, 2)
    assert counts.f1 == pytest.approx(2 / 5)
    assert match_instances(truth, truth).f1 == 1.0
    assert match_instances(truth, np.zeros_like(truth)) == MatchCounts(0, 0, 3)
    with pytest.raises(ValueError, match="shape"):
        match_instances(truth, truth[:10])


def test_segmentation_imports_no_framework() -> None:
    code = (
        "import sys, numpy as np; from appliance.pipeline.segmentation import Segmenter; "
        "from tests.segmenter_model import OracleNetwork, discs, oracle_section; "
        "from appliance.pipeline.segmentation import segmenter_spec; "
        "s = Segmenter(OracleNetwork(), segmenter_spec(oracle_section()), threads=1); "
        "s.segment(discs((64, 64), [(32, 32)], 12)); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'torch'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


needs_tensorflow = pytest.mark.skipif(
    not tensorflow_available(), reason="TensorFlow / tf2onnx not installed (export extra)"
)


@pytest.mark.slow
@needs_tensorflow
def test_onnx_path_gives_stardists_own_labels() -> None:
    from cytoedge_demo.synthetic import segmentation_tiles
    from export.segmenter import load_stardist

    model_dir, onnx_dir, section = trained_stardist()
    segmenter = Segmenter.open(onnx_dir, section, RuntimeSettings("ort-cpu", threads=2))
    model = load_stardist(model_dir)
    images, _ = segmentation_tiles(2, 300, HELD_OUT_SEED + 1)
    for image in images:
        labels, found = segmenter.segment(image)
        expected, details = model.predict_instances(
            network_input(image, segmenter.spec), verbose=False
        )
        assert len(found) == len(details["prob"]) > 0
        np.testing.assert_array_equal(labels, expected)


@pytest.mark.slow
@needs_tensorflow
def test_f1_on_held_out_segmentation_tiles() -> None:
    from cytoedge_demo.bench.segmentation import evaluate

    _, onnx_dir, section = trained_stardist()
    segmenter = Segmenter.open(onnx_dir, section, RuntimeSettings("ort-cpu", threads=2))
    counts = evaluate(segmenter, n_tiles=8, size=512, seed=HELD_OUT_SEED)
    assert counts.true_positives + counts.false_negatives > 40  # enough cells to judge
    assert counts.f1 >= F1_FLOOR, counts
