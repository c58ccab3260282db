"""The encoder's preprocessing folded into its graph: uint8 crops in, embeddings out.

Without it the runtime resizes each 128 px crop to 224 px and normalises it on the CPU,
and sends float32 (N, 3, 224, 224) to the network: 9x the bytes of the crop. A folded
encoder takes ``crops`` uint8 (N, P, P, 3) as cut from the tile and does the rest itself:
cast, bilinear resize to the network's side (half-pixel centres, as Pillow's bilinear
upscaling), ``(x / 255 - mean) / std`` and the transpose to NCHW, then the network.

The fold is applied to every exported variant (fp32, fp16, int8) after its own gate, and
is gated again: the folded file on rendered crops against the same file fed as the
runtime fed it before (Pillow resize, then normalised), per-row cosine. The two differ
only in Pillow rounding the resized crop to uint8.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from appliance.pipeline.cells import resize_bilinear
from export.onnx_export import ParityError, ParityReport, embedding_parity, ort_session
from export.probe_cells import render_cell_patches
from runtime.bundle_format import InputSpec
from runtime.encoder import encoder_feeds
from runtime.parity import ENCODER_MIN_COSINE_BY_VARIANT

CROPS_INPUT = "crops"
PIXELS_INPUT = "pixels"
GATE_CROPS = 24
# Pillow rounds the resized crop to uint8 (up to half a grey level); the graph does not.
ROUNDING_COSINE_ALLOWANCE = 1e-4


def fold_crop_input(
    source: Path,
    target: Path,
    crop_px: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> None:
    """Write ``target``: ``source``'s network behind a ``crops`` uint8 (N, P, P, 3) input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    [network_input] = [i for i in graph.input if i.name == PIXELS_INPUT]
    float_type = network_input.type.tensor_type.elem_type
    float_dtype = helper.tensor_dtype_to_np_dtype(float_type)
    mean_255 = np.asarray(mean, np.float64).reshape(1, 3, 1, 1) * 255.0
    scale = 1.0 / (np.asarray(std, np.float64).reshape(1, 3, 1, 1) * 255.0)
    constants = {
        "crop_mean": mean_255.astype(float_dtype),
        "crop_scale": scale.astype(float_dtype),
        "crop_scales": np.asarray([1, 1, size / crop_px, size / crop_px], np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    nodes = [
        helper.make_node("Cast", [CROPS_INPUT], ["crop_float"], to=float_type),
        helper.make_node("Transpose", ["crop_float"], ["crop_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Resize",
            ["crop_nchw", "", "crop_scales"],
            ["crop_resized"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Sub", ["crop_resized", "crop_mean"], ["crop_centred"]),
        helper.make_node("Mul", ["crop_centred", "crop_scale"], [PIXELS_INPUT]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.input.remove(network_input)
    graph.input.insert(
        0,
        helper.make_tensor_value_info(
            CROPS_INPUT, TensorProto.UINT8, ["batch", crop_px, crop_px, 3]
        ),
    )
    onnx.checker.check_model(model)
    onnx.save_model(model, str(target))


def render_crops(count: int, crop_px: int, seed: int) -> np.ndarray:
    """Rendered nucleated-cell crops, uint8 (count, crop_px, crop_px, 3)."""
    return render_cell_patches(count, seed, crop_px)


def pixels_as_before(
    crops: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """What the runtime fed an unfolded encoder: Pillow bilinear to ``size``, normalised."""
    resized = np.stack([resize_bilinear(c, size) for c in crops])
    spec = InputSpec(size=size, mean=tuple(mean), std=tuple(std))  # type: ignore[arg-type]
    return encoder_feeds(spec, resized)[PIXELS_INPUT]


def fold_in_place(
    path: Path,
    variant: str,
    crop_px: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> ParityReport:
    """Fold ``path``'s preprocessing into it if, and only if, the fold's gate passes.

    The gate: cosine of each row (rendered crops) between the folded file fed the crops
    and the original fed what the runtime made of them; the variant's own limit, less
    the rounding allowance. A failed gate leaves ``path`` as it was.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        folded = staging / path.name
        fold_crop_input(path, folded, crop_px, size, mean, std)
        crops = render_crops(GATE_CROPS, crop_px, seed=4040)
        (before,) = ort_session(path).run(
            ["embedding"], {PIXELS_INPUT: pixels_as_before(crops, size, mean, std)}
        )
        (after,) = ort_session(folded).run(["embedding"], {CROPS_INPUT: crops})
        report = embedding_parity(
            f"encoder {path.name} with its preprocessing folded in (uint8 crops)",
            [(before, after)],
            ENCODER_MIN_COSINE_BY_VARIANT[variant] - ROUNDING_COSINE_ALLOWANCE,
        )
        report.metrics["crop_px"] = crop_px
        if not report.passed:
            raise ParityError(report)
        shutil.move(str(folded), path)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
