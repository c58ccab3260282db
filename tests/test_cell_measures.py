"""The cell head's figures, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.validation.cell_measures import cell_figures, operating_point
from runtime.taxonomy import CellClass, CriticalConfusion, Taxonomy

THREE = Taxonomy(
    name="three",
    title="three classes",
    classes=(
        CellClass("blast", "Blast", ("progenitor",), (200, 0, 0)),
        CellClass("lymphocyte", "Lymphocyte", ("lymphoid",), (0, 0, 200)),
        CellClass("monocyte", "Monocyte", ("myeloid",), (0, 150, 0)),
    ),
    critical=(CriticalConfusion("blast", ("lymphocyte",), 3.0, "a blast called normal"),),
)


def test_per_class_and_averaged_figures_by_hand() -> None:
    truth = ["blast", "blast", "blast", "lymphocyte", "lymphocyte", "monocyte"]
    # called: blast, lymphocyte, blast, lymphocyte, monocyte, monocyte
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.3, 0.6, 0.1],
            [0.8, 0.1, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.3, 0.5],
            [0.1, 0.1, 0.8],
        ]
    )
    figures = cell_figures(THREE, truth, probabilities, confidence_needed=0.7)
    blast, lymphocyte, monocyte = figures.classes
    assert (blast.support, blast.precision, blast.recall) == (3, 1.0, pytest.approx(2 / 3))
    assert blast.f1 == pytest.approx(0.8)
    assert (lymphocyte.precision, lymphocyte.recall, lymphocyte.f1) == (0.5, 0.5, 0.5)
    assert (monocyte.precision, monocyte.recall) == (0.5, 1.0)
    assert monocyte.f1 == pytest.approx(2 / 3)
    assert figures.accuracy == pytest.approx(4 / 6)
    assert figures.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert figures.weighted_f1 == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3) / 6)
    assert figures.confusion == ((2, 1, 0), (0, 1, 1), (0, 0, 1))
    # One blast was called a lymphocyte, at 0.6: below the operating point of 0.7.
    assert (figures.critical_errors, figures.critical_errors_sure) == (1, 0)
    point = figures.operating_point
    assert (point.coverage, point.accuracy) == (pytest.approx(4 / 6), 1.0)


def test_the_operating_point_is_the_lowest_confidence_that_reaches_the_target() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.9, 0.8, 0.6])
    correct = np.array([True, True, True, False, True, False])
    point = operating_point(confidence, correct, target=1.0)
    # 0.9 is shared by a right and a wrong cell: a threshold cannot split them.
    assert (point.confidence, point.coverage, point.accuracy, point.reached) == (
        0.95,
        pytest.approx(2 / 6),
        1.0,
        True,
    )
    point = operating_point(confidence, correct, target=0.8)
    assert (point.confidence, point.coverage) == (0.8, pytest.approx(5 / 6))
    never = operating_point(np.array([0.7, 0.6]), np.array([False, True]), target=0.99)
    assert not never.reached and never.confidence == 0.7 and never.coverage == 0.5
