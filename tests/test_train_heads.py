"""The demo head's training loop: metrics, loss masking, the folded standardisation, learning."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.heads import build_head  # noqa: E402
from export.train_heads import (  # noqa: E402
    HeadRecipe,
    auc,
    focal_loss,
    fold_standardisation,
    predict_bags,
    train_gated_mil,
    youden_threshold,
)


def test_auc_counts_ties_half_and_ignores_missing_labels() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert auc(np.array([0.2, 0.9, 0.3]), np.array([0, 1, np.nan])) == pytest.approx(1.0)
    assert np.isnan(auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_youden_threshold_separates_separable_scores() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    threshold = youden_threshold(scores, labels)
    assert 0.3 < threshold < 0.6


def test_focal_loss_masks_missing_labels() -> None:
    p = torch.tensor([0.9, 0.2, 0.5])
    ones = torch.ones(3)
    with_missing = focal_loss(p, torch.tensor([1.0, 0.0, float("nan")]), ones, ones, 2.0)
    without = focal_loss(p[:2], torch.tensor([1.0, 0.0]), ones[:2], ones[:2], 2.0)
    assert torch.isfinite(with_missing)
    assert with_missing.item() == pytest.approx(without.item())


def test_folding_the_standardisation_keeps_outputs() -> None:
    rng = np.random.default_rng(0)
    model = build_head("gated_attention_mil", {"in_dim": 8, "hidden_dim": 16, "attention_dim": 8})
    bag = (rng.normal(size=(11, 8)) * 3 + 5).astype(np.float32)
    mean, std = bag.mean(0), bag.std(0) + 1e-6
    before = predict_bags(model, [((bag - mean) / std).astype(np.float32)])
    fold_standardisation(model, mean, std)
    after = predict_bags(model, [bag])
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_a_planted_bag_signal_is_learned_and_generalises() -> None:
    rng = np.random.default_rng(1)
    dim, tasks = 24, ("a", "b")
    directions = rng.normal(size=(len(tasks), dim))

    def bags(n: int) -> tuple[list[np.ndarray], np.ndarray]:
        labels = rng.integers(0, 2, (n, len(tasks))).astype(np.float32)
        out = []
        for y in labels:
            cells = rng.normal(size=(int(rng.integers(20, 40)), dim)) + 2.0
            affected = rng.random(len(cells)) < 0.6  # like the generator's clone fraction
            cells[affected] += y @ directions * 1.5
            out.append(cells.astype(np.float32))
        return out, labels

    (train, y_train), (val, y_val), (test, y_test) = bags(32), bags(12), bags(24)
    trained = train_gated_mil(
        train, y_train, val, y_val, tasks, HeadRecipe(epochs=10, hidden_dim=32, attention_dim=16)
    )
    predicted = predict_bags(trained.model, test)
    for t in range(len(tasks)):
        assert auc(predicted[:, t], y_test[:, t]) >= 0.9
    assert set(trained.thresholds) == set(tasks)
