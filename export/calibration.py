"""Calibration fitted on out-of-fold predictions: Platt scaling per task (sigmoid
heads) and one temperature (softmax heads), the forms ``runtime.head_kinds`` apply
to the ensemble mean.

Both fit smoothed targets, as Platt (1999) does: a positive counts as
(N+ + 1) / (N+ + 2) and a negative as 1 / (N- + 2) (for classes: the true class
1 - 1 / (N + 2), the rest share the remainder), so that perfectly separated
out-of-fold predictions, common on small cohorts, give a finite slope or
temperature instead of an infinitely confident one.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar

_EPS = 1e-7
TEMPERATURE_RANGE = (0.05, 20.0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(a, b) of p' = sigmoid(a * logit(p) + b); NaN labels are left out; (1, 0)
    (no change) when the labels hold one class."""
    p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    keep = ~np.isnan(y)
    x, y = _logit(p[keep]), y[keep] > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0
    target = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] * x + params[1]
        q = 1 / (1 + np.exp(-z))
        value = np.sum(np.logaddexp(0, z) - target * z)
        grad = q - target
        return float(value), np.array([np.sum(grad * x), np.sum(grad)])

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    a, b = (float(v) for v in result.x)
    return (a, b) if a > 0 else (1.0, 0.0)  # a falling curve would reverse the ranking


def fit_temperature(probabilities: np.ndarray, classes: np.ndarray) -> float:
    """T of softmax(log p / T), minimising the smoothed cross-entropy; ``classes`` are
    indices, -1 for cases without a class."""
    p = np.clip(np.asarray(probabilities, np.float64), _EPS, 1.0)
    classes = np.asarray(classes)
    keep = classes >= 0
    log_p, truth = np.log(p[keep]), classes[keep]
    if len(truth) == 0:
        return 1.0
    n, count = log_p.shape
    smooth = 1 / (n + 2)
    target = np.full((n, count), smooth / max(count - 1, 1))
    target[np.arange(n), truth] = 1 - smooth

    def loss(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-(target * log_q).sum())

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded")
    return float(np.exp(result.x))
