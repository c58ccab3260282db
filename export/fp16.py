"""fp16 ONNX of a checked fp32 model, for ONNX Runtime's CUDA provider.

The encoder's fp16 variant, and the patient encoder's (export/patient_export.py, which
feeds its probe bags to the same conversion and gate). Weights and most arithmetic go to
fp16; LayerNormalization and Softmax stay fp32 (their reductions lose accuracy or
overflow in fp16) and the graph keeps float32 inputs and outputs, so callers feed the
same arrays as for fp32. On a CPU, ONNX Runtime runs fp16 by upcasting, so the gate here
checks the conversion loosely (cosine >= 0.999); the precision that matters is measured
on the GPU by ``cytoedge bench encoder``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.onnx_export import (
    ParityReport,
    default_encoder_probe,
    embedding_parity,
    gated_export,
    ort_session,
)
from runtime.parity import FP16_MIN_COSINE

if TYPE_CHECKING:
    from collections.abc import Sequence

    import onnx

KEEP_FP32_OPS = ("LayerNormalization", "Softmax")


def convert_to_fp16(fp32_path: Path, out_path: Path) -> None:
    """Write the fp16 version of ``fp32_path`` (no check: see :func:`export_fp16`)."""
    import onnx
    from onnxconverter_common import float16

    model = _fold_initializer_identities(onnx.load(str(fp32_path)))
    with warnings.catch_warnings():  # one warning per weight below fp16's range: noise
        warnings.filterwarnings("ignore", "the float32 number", UserWarning)
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *KEEP_FP32_OPS],
        )
    onnx.save_model(converted, str(out_path))


def _fold_initializer_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give each ``Identity(initializer)`` output its own initializer.

    The torch exporter shares equal weights (e.g. LayerNorm biases) through Identity nodes;
    the fp16 converter then mistypes them where a kept-fp32 op reads them.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def fp16_parity(
    fp32_path: Path,
    fp16_path: Path,
    batches: Sequence[np.ndarray] | None = None,
    *,
    input_name: str = "pixels",
    model: str = "encoder",
) -> ParityReport:
    """fp16 vs fp32 ONNX ``embedding`` (CPU execution) on ``batches`` fed as
    ``input_name``; by default the encoder's cell-like images."""
    batches = list(batches) if batches is not None else default_encoder_probe()
    reference, candidate = ort_session(fp32_path), ort_session(fp16_path)
    return embedding_parity(
        f"{model.replace('_', ' ')} {fp16_path.name} (fp16 ONNX vs fp32 ONNX, CPU)",
        (
            (
                reference.run(["embedding"], {input_name: batch})[0],
                candidate.run(["embedding"], {input_name: batch})[0],
            )
            for batch in batches
        ),
        FP16_MIN_COSINE,
    )


def export_fp16(
    fp32_path: str | Path,
    out_path: str | Path,
    batches: Sequence[np.ndarray] | None = None,
    *,
    input_name: str = "pixels",
    model: str = "encoder",
) -> ParityReport:
    """Convert, check (:func:`fp16_parity`) and only then write ``out_path``; raises
    ParityError on a failed gate. ``model`` is the file's ``cytoedge.model``."""
    fp32_path = Path(fp32_path)
    return gated_export(
        lambda path: convert_to_fp16(fp32_path, path),
        lambda path: fp16_parity(fp32_path, path, batches, input_name=input_name, model=model),
        Path(out_path),
        {"cytoedge.model": model, "cytoedge.precision": "fp16"},
    )
