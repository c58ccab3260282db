"""What a converted or accelerated network must keep against its fp32 reference.

The limits the export gates apply, and the measures they use, in one place: the
model owner's gates (export/) and the site's GPU self-test
(``cytoedge doctor --gpu-self-test``) both read them, so a site holds its GPU to
exactly what the bundle was held to when it was made. numpy only.
"""

from __future__ import annotations

import numpy as np

ENCODER_MIN_COSINE = 0.99999  # fp32 ONNX vs torch; fp32 on another backend vs ONNX Runtime CPU
FP16_MIN_COSINE = 0.999  # fp16 ONNX, and TensorRT's fp16 engines, vs fp32 ONNX
INT8_MIN_COSINE = 0.99  # int8 ONNX vs fp32 ONNX (and no head call may change)
HEAD_MAX_PROBABILITY_DIFF = 1e-4  # fp32 heads (hemoglobin too)
HEAD_MIN_ATTENTION_COSINE = 0.99999  # fp32 heads, on attention centred at its mean
SEGMENTER_PROB_TOLERANCE = 1e-4  # StarDist's prob, fp32
SEGMENTER_DIST_TOLERANCE = 2e-3  # StarDist's ray lengths in pixels, fp32
# int8 StarDist vs fp32 on held-out tiles (and StarDist at any reduced precision, such
# as OpenVINO's bf16, in the site's self-test): every fp32 detection matched at IoU 0.5, extra
# detections at most this share of fp32's (an object whose probability sits at the
# threshold may cross it), F1 against the truth within this much.
SEGMENTER_INT8_MIN_IOU = 0.5
SEGMENTER_INT8_MAX_EXTRA = 0.01
SEGMENTER_INT8_MAX_F1_CHANGE = 0.01
ENCODER_MIN_COSINE_BY_VARIANT = {
    "fp32": ENCODER_MIN_COSINE,
    "fp16": FP16_MIN_COSINE,
    "bf16": FP16_MIN_COSINE,  # OpenVINO's bf16 inference precision, judged as fp16
    "int8": INT8_MIN_COSINE,
    "int8_static": INT8_MIN_COSINE,  # NNCF's static int8 for OpenVINO, the same gate
}


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (float64, so the metric adds no error itself)."""
    a = reference.astype(np.float64).reshape(len(reference), -1)
    b = candidate.astype(np.float64).reshape(len(candidate), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-30)


def centred_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine of two vectors after removing the reference's mean from both: attention
    weights of a long bag are all near 1 / N, and a plain cosine of two near-uniform
    vectors is ~1 whatever they hold."""
    mean = float(reference.astype(np.float64).mean())
    return float(row_cosines(reference[None] - mean, candidate[None] - mean)[0])


def bag_features(length: int, dim: int, seed: int) -> np.ndarray:
    """An embedding-like bag: a shared offset (embeddings of one bag are correlated) + spread."""
    rng = np.random.default_rng(seed)
    common = rng.normal(0.0, 1.0, dim)
    return (common + rng.normal(0.0, 1.0, (length, dim))).astype(np.float32)


def stained_field(height: int, width: int, cells: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): round violet nuclei with paler cytoplasm on pink glass, softly
    edged, with noise. Not a smear, but not noise either: inputs a network's
    numerics can be judged on without any demo or test code at a site."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[:] = (236.0, 214.0, 222.0)  # glass
    for _ in range(cells):
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.10, 0.22) * min(height, width) / max(1.0, cells**0.5) * 2
        distance = np.hypot(rows - y, cols - x)
        cytoplasm = np.clip((radius - distance) / 2.0, 0.0, 1.0)[..., None]
        nucleus = np.clip((0.6 * radius - distance) / 2.0, 0.0, 1.0)[..., None]
        image = image * (1 - cytoplasm) + np.array([196.0, 170.0, 214.0]) * cytoplasm
        tint = rng.uniform(-12, 12, 3)
        image = image * (1 - nucleus) + (np.array([92.0, 52.0, 140.0]) + tint) * nucleus
    image += rng.normal(0.0, 4.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
