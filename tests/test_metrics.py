"""The metrics of train and validate, against values worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.pipeline.differential import wilson_interval
from appliance.validation import metrics

# Four cases: 0 and 1 negative, 2 and 3 positive.
SCORES = np.array([0.1, 0.4, 0.35, 0.8])
LABELS = np.array([0, 0, 1, 1])


def test_auc_counts_pairs_ties_half_and_ignores_unknown_labels() -> None:
    # Pairs (positive, negative): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1), (0.8, 0.4) yes.
    assert metrics.auc(SCORES, LABELS) == pytest.approx(3 / 4)
    assert metrics.auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert metrics.auc(np.array([0.2, 0.9, 0.3]), np.array([0, 1, np.nan])) == 1.0
    assert np.isnan(metrics.auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_roc_corners_run_from_nothing_called_to_everything_called() -> None:
    curve = metrics.roc_curve(SCORES, LABELS)
    # Thresholds inf, 0.8, 0.4, 0.35, 0.1: (fpr, tpr) = (0,0) (0,.5) (.5,.5) (.5,1) (1,1).
    assert curve.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert curve.tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_bootstrap_interval_by_hand_with_a_fixed_seed() -> None:
    # Seed 1 draws these five resamples of the four cases (numpy's PCG64 stream):
    drawn = [[1, 2, 3, 3], [0, 0, 3, 3], [0, 1, 3, 1], [1, 3, 1, 1], [2, 2, 0, 0]]
    assert metrics.bootstrap_indices(4, 5, seed=1).tolist() == drawn
    # Their AUCs: {0.4} vs {0.35, 0.8, 0.8} = 2/3, then 1, 1, 1, 1. Sorted 2/3, 1, 1, 1, 1;
    # the 2.5th percentile lies 0.1 of the way from the first to the second: 2/3 + 0.1/3.
    low, high = metrics.bootstrap_auc_interval(SCORES, LABELS, resamples=5, seed=1)
    assert low == pytest.approx(0.7)
    assert high == pytest.approx(1.0)


def test_bootstrap_leaves_out_resamples_of_one_class() -> None:
    # Seed 0: [3,2,2,1] AUC 1/3, [1,0,0,0] negatives only, [0,3,2,3] AUC 1, then two
    # resamples of positives only. Two values, 1/3 and 1: the percentiles interpolate.
    assert metrics.bootstrap_indices(4, 5, seed=0).tolist() == [
        [3, 2, 2, 1],
        [1, 0, 0, 0],
        [0, 3, 2, 3],
        [2, 2, 3, 2],
        [2, 2, 2, 3],
    ]
    low, high = metrics.bootstrap_auc_interval(SCORES, LABELS, resamples=5, seed=0)
    assert low == pytest.approx(1 / 3 + 0.025 * 2 / 3)
    assert high == pytest.approx(1 / 3 + 0.975 * 2 / 3)
    both = metrics.bootstrap_auc_interval(SCORES, np.ones(4), resamples=5, seed=0)
    assert all(np.isnan(both))


def test_wilson_interval_by_hand() -> None:
    # 8/10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674, half-width 0.22658.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5)
    assert high == pytest.approx(0.94332, abs=1e-5)
    # 0/5: the interval starts at 0 and reaches z^2/5 / (1 + z^2/5) = 0.43448.
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.43448), abs=1e-5)
    assert all(np.isnan(wilson_interval(0, 0)))


def test_youden_threshold_by_hand() -> None:
    # Candidates between sorted scores 0.1 | 0.35 | 0.4 | 0.8: J at 0.225 is 1 - 0.5 = 0.5,
    # at 0.375 0.5 - 0.5 = 0, at 0.6 0.5 - 0 = 0.5; the lowest of the best wins.
    assert metrics.youden_threshold(SCORES, LABELS) == pytest.approx(0.225)
    assert metrics.youden_threshold(SCORES, np.ones(4)) == 0.5


def test_threshold_for_a_target_sensitivity() -> None:
    # Sensitivity is 1 up to 0.225, then 0.5 at 0.375 and 0.6: the highest reaching 0.5 is 0.6.
    assert metrics.threshold_for_sensitivity(SCORES, LABELS, 0.5) == pytest.approx(0.6)
    assert metrics.threshold_for_sensitivity(SCORES, LABELS, 1.0) == pytest.approx(0.225)


def test_expected_calibration_error_by_hand() -> None:
    # Two bins: [0, 0.5) holds 0.1 (neg) and 0.2 (pos): mean 0.15, observed 0.5, gap 0.35;
    # [0.5, 1] holds 0.7 and 0.9 (both pos): mean 0.8, observed 1, gap 0.2.
    # ECE = (2 * 0.35 + 2 * 0.2) / 4 = 0.275.
    table = metrics.reliability(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 1, 1, 1]), bins=2)
    assert table.counts.tolist() == [2, 2]
    assert table.predicted == pytest.approx([0.15, 0.8])
    assert table.observed == pytest.approx([0.5, 1.0])
    assert table.ece == pytest.approx(0.275)
    # 1.0 falls in the last bin; an empty bin is left out of the mean.
    edge = metrics.reliability(np.array([1.0]), np.array([1]), bins=4)
    assert edge.counts.tolist() == [0, 0, 0, 1] and edge.ece == pytest.approx(0.0)


def test_calls_count_determinate_calls_only() -> None:
    calls = ["positive", "positive", "negative", "indeterminate", "negative"]
    truth = [True, False, True, True, False]
    counts = metrics.count_calls(calls, truth)
    assert (counts.tp, counts.fp, counts.tn, counts.fn, counts.indeterminate) == (1, 1, 1, 1, 1)
    assert counts.sensitivity == (1, 2) and counts.npv == (1, 2)


def test_confusion_recall_and_top_k() -> None:
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.1, 0.4], [0.1, 0.2, 0.7]])
    truth = [0, 1, 2, 2]
    matrix = metrics.confusion_matrix(truth, probabilities.argmax(1).tolist(), 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert metrics.per_class_recall(matrix).tolist() == [1.0, 1.0, 0.5]
    assert metrics.macro_recall(matrix) == pytest.approx(2.5 / 3)
    assert metrics.top_k_accuracy(probabilities, truth, 1) == pytest.approx(0.75)
    # Case 2's true class is its second most probable.
    assert metrics.top_k_accuracy(probabilities, truth, 2) == pytest.approx(1.0)


def test_a_burden_of_no_classified_cell_is_not_measured_and_not_shown_inside() -> None:
    from appliance.results import BurdenRecord

    common = {"group": "plasma_cells", "label": "Plasma cells", "minimum": 10.0, "rule": "warn"}
    inside = BurdenRecord(count=40, classified=200, percent=20.0, low=15.0, high=26.0, **common)
    assert inside.measured and not inside.below and inside.outside is None
    unknown = BurdenRecord(count=0, classified=0, percent=0.0, low=0.0, high=0.0, **common)
    assert not unknown.measured and unknown.below  # the inclusion rule applies to it too
    assert unknown.sentence().startswith("Plasma cells not measured: no cell was classified")
    assert "0.0 %" not in unknown.sentence()
