"""NMS over the candidates that can still matter (appliance/pipeline/star_nms.py) keeps what
stardist's NMS on every candidate keeps: on exact oracle discs, on synthetic tiles and on
the real photos of ../shared/data (skipped where absent) through the test StarDist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.pipeline import star_nms
from appliance.pipeline.segmentation import (
    BORDER_CELLS,
    Segmenter,
    match_detections,
    segmenter_spec,
)
from runtime.backends import RuntimeSettings
from runtime.parity import SEGMENTER_INT8_MAX_EXTRA, SEGMENTER_INT8_MIN_IOU
from tests.conftest import SHARED_DATA
from tests.segmenter_model import (
    OracleNetwork,
    discs,
    oracle_section,
    tensorflow_available,
    trained_stardist,
)

# Discs of two sizes 4-9 px apart: neighbours' candidates reach into each other.
CENTRES = [(40, 40), (40, 80), (80, 60), (130, 40), (130, 80), (190, 150), (60, 175), (120, 190)]


def crowded_tile() -> np.ndarray:
    image = discs((240, 240), CENTRES[:5], 18)
    return np.minimum(image, discs((240, 240), CENTRES[5:], 26))


def candidates(segmenter: Segmenter, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """(points, probs, dists) of every grid cell above the threshold, as ``detect`` takes them."""
    from stardist.nms import _ind_prob_thresh

    prob, dist = segmenter.predict(image)
    above = _ind_prob_thresh(prob, segmenter.spec.prob_thresh, b=BORDER_CELLS)
    points = np.argwhere(above) * np.asarray(segmenter.spec.grid)
    return points, prob[above], dist[above]


def test_the_same_objects_as_nms_on_every_candidate_from_fewer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    section = oracle_section(nms_thresh=0.3)
    image = crowded_tile()
    reference = Segmenter(OracleNetwork(), segmenter_spec(section), every_candidate=True)
    pruned = Segmenter(OracleNetwork(), segmenter_spec(section))
    sizes: list[int] = []
    nms = star_nms._stardist_nms
    monkeypatch.setattr(star_nms, "_stardist_nms", lambda *a: sizes.append(len(a[-1])) or nms(*a))
    expected = reference.detect(image)
    (total,) = sizes
    found = pruned.detect(image)
    assert len(expected) == len(CENTRES)
    # The oracle's centres tie at probability 1, and stardist orders ties as its sort
    # happens to: which centre of a plateau is kept may differ, not the object.
    counts = match_detections(expected, found, (240, 240), iou=0.9)
    assert (counts.true_positives, counts.false_negatives, counts.false_positives) == (8, 0, 0)
    assert 0 < max(sizes[1:]) < total / 4  # the NMS ran on a fraction of the candidates


def test_without_seeds_or_judgements_it_is_stardists_nms_on_everything() -> None:
    section = oracle_section(nms_thresh=0.3)
    points, probs, dists = candidates(Segmenter(OracleNetwork(), section), crowded_tile())
    everything = star_nms.suppress_all(points, probs, dists, 0.3)
    nothing = np.zeros(len(probs), bool)
    np.testing.assert_array_equal(star_nms.suppress(points, probs, dists, 0.3, nothing), everything)
    # Every candidate a seed: the set is all of them from the start.
    np.testing.assert_array_equal(
        star_nms.suppress(points, probs, dists, 0.3, ~nothing), everything
    )


def test_lens_area_of_discs() -> None:
    area = star_nms.lens_area(np.array([5.0, 5.0, 5.0, 3.0]), np.array([5.0, 5.0, 5.0, 6.0]),
                              np.array([0.0, 10.0, 5.0, 1.0]))  # fmt: skip
    assert area[0] == pytest.approx(np.pi * 25)  # the same disc
    assert area[1] == 0.0  # touching
    assert area[2] == pytest.approx(2 * 25 * np.arccos(0.5) - 0.5 * 5 * np.sqrt(75))
    assert area[3] == pytest.approx(np.pi * 9)  # the small disc inside the large one
    square = np.full((1, 4), np.sqrt(2.0))  # 4 rays of sqrt 2: the square of side 2
    assert star_nms.polygon_area(square)[0] == pytest.approx(4.0)


def real_photos() -> list[tuple[str, np.ndarray]]:
    """The shared BCCD and Chula photos at the working grid (their estimated pixel sizes)."""
    from appliance.pipeline.fields import read_field
    from appliance.readers.field_folder import single_field

    photos = []
    for folder, um in (("bccd-sample", 0.07), ("chula-sample", 0.2)):
        for path in sorted((SHARED_DATA / folder).glob("*.jpg")):
            if path.stat().st_size:  # BloodImage_00306.jpg is an empty file
                photos.append((path.name, read_field(single_field(Path(path), um), 0)[0]))
    return photos


@pytest.mark.slow
@pytest.mark.skipif(not tensorflow_available(), reason="TensorFlow / tf2onnx not installed")
@pytest.mark.skipif(not (SHARED_DATA / "chula-sample").is_dir(), reason="shared data absent")
def test_parity_with_nms_on_every_candidate_on_real_and_synthetic_tiles() -> None:
    from cytoedge_demo.synthetic import segmentation_tiles

    _, onnx_dir, section = trained_stardist()
    pruned = Segmenter.open(onnx_dir, section, RuntimeSettings("ort-cpu", threads=2))
    reference = Segmenter(pruned.network, section, 2, every_candidate=True)
    synthetic, _ = segmentation_tiles(3, 928, 778)
    tiles = [*real_photos(), *((f"synthetic {i}", t) for i, t in enumerate(synthetic))]
    assert len(tiles) >= 15
    detections = extra = 0
    for name, tile in tiles:
        expected, found = reference.detect(tile), pruned.detect(tile)
        counts = match_detections(expected, found, tile.shape[:2], SEGMENTER_INT8_MIN_IOU)
        assert counts.false_negatives == 0, name
        detections, extra = detections + len(expected), extra + counts.false_positives
    assert detections > 100
    assert extra <= SEGMENTER_INT8_MAX_EXTRA * detections
