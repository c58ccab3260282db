"""Small ONNX networks with the bundle's I/O contract, built with onnx.helper, and a
bundle made of them. Each has a numpy twin so tests can check results exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.bundle_format import Bundle, EncoderSpec, HeadSpec, InputSpec, write_bundle

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MIL_TASKS = ("del17p", "t4_14", "t11_14", "gain1q")
PB_CLASSES = ("acute_leukemia", "lymphoma", "mds", "healthy")


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def encoder_model(path: Path, weight: np.ndarray, size: int) -> Path:
    """pixels (N,3,S,S) -> embedding (N,D): per-channel means times ``weight`` (3,D), tanh."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["projected"]),
            helper.make_node("Tanh", ["projected"], ["embedding"]),
        ],
        "encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return _save(graph, path)


def encoder_reference(pixels: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.tanh(pixels.mean(axis=(2, 3)) @ weight)


def head_model(path: Path, attention_w: np.ndarray, out_w: np.ndarray, kind: str) -> Path:
    """features (N,D) -> attention softmax over cells, pooled vector, sigmoid or softmax.

    The transformer kind also gives ``hemoglobin`` (1,) = sum of the pooled vector.
    """
    nodes = [
        helper.make_node("MatMul", ["features", "aw"], ["scores"]),  # (N,1)
        helper.make_node("Softmax", ["scores"], ["weights"], axis=0),
        helper.make_node("Reshape", ["weights", "flat"], ["attention"]),  # (N,)
        helper.make_node("MatMul", ["attention", "features"], ["pooled"]),  # (D,)
        helper.make_node("MatMul", ["pooled", "ow"], ["logits"]),  # (T,)
    ]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [out_w.shape[1]]),
        helper.make_tensor_value_info("attention", TensorProto.FLOAT, ["cells"]),
    ]
    if kind == "gated_attention_mil":
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["probabilities"]))
    else:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=0))
        nodes.append(helper.make_node("ReduceSum", ["pooled", "one"], ["hemoglobin"], keepdims=1))
        outputs.append(helper.make_tensor_value_info("hemoglobin", TensorProto.FLOAT, [1]))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["cells", out_w.shape[0]])],
        outputs,
        [
            numpy_helper.from_array(attention_w.astype(np.float32).reshape(-1, 1), "aw"),
            numpy_helper.from_array(out_w.astype(np.float32), "ow"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "one"),
        ],
    )
    return _save(graph, path)


def head_reference(
    features: np.ndarray, attention_w: np.ndarray, out_w: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray, float]:
    scores = features @ attention_w
    attention = np.exp(scores - scores.max())
    attention /= attention.sum()
    pooled = attention @ features
    logits = pooled @ out_w
    if kind == "gated_attention_mil":
        probabilities = 1 / (1 + np.exp(-logits))
    else:
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
    return probabilities, attention, float(pooled.sum())


class TinyBundle:
    """A bundle of the small networks above, with their weights kept for reference."""

    def __init__(self, root: Path, *, size: int = 32, dim: int = 16, with_int8: bool = False):
        rng = np.random.default_rng(7)
        self.size, self.dim = size, dim
        work = root / "parts"
        self.encoder_w = rng.normal(size=(3, dim))
        self.int8_w = rng.normal(size=(3, dim))  # distinct, so a test can tell which ran
        sources = {"encoder.onnx": encoder_model(work / "e.onnx", self.encoder_w, size)}
        variants = {"fp32": "encoder.onnx"}
        if with_int8:
            sources["encoder.int8.onnx"] = encoder_model(work / "e8.onnx", self.int8_w, size)
            variants["int8"] = "encoder.int8.onnx"
        self.mil = [(rng.normal(size=dim), rng.normal(size=(dim, 4))) for _ in range(2)]
        self.pb = [(rng.normal(size=dim), rng.normal(size=(dim, 4))) for _ in range(3)]
        for k, (aw, ow) in enumerate(self.mil):
            relative = f"heads/mm_risk.{k}.onnx"
            sources[relative] = head_model(work / relative, aw, ow, "gated_attention_mil")
        for k, (aw, ow) in enumerate(self.pb):
            relative = f"heads/pb_screen.{k}.onnx"
            sources[relative] = head_model(work / relative, aw, ow, "transformer_mil")
        self.sources = sources
        self.encoder = EncoderSpec(
            architecture="test_mean_projection",
            embed_dim=dim,
            variants=variants,
            input=InputSpec(size=size, mean=MEAN, std=STD),
            int8_note="test int8 model" if with_int8 else "no int8 model",
        )
        self.heads = [
            HeadSpec(
                name="mm_risk",
                kind="gated_attention_mil",
                files=("heads/mm_risk.0.onnx", "heads/mm_risk.1.onnx"),
                labels={"del17p": "del(17p)", "t4_14": "t(4;14)"},
                thresholds={"del17p": 0.5, "t4_14": 0.4, "t11_14": 0.6, "gain1q": 0.5},
                indeterminate_band=0.05,
                extra={"tasks": MIL_TASKS, "high_risk": ("del17p", "t4_14")},
            ),
            HeadSpec(
                name="pb_screen",
                kind="transformer_mil",
                files=tuple(f"heads/pb_screen.{k}.onnx" for k in range(3)),
                thresholds={"malignancy": 0.5},
                indeterminate_band=0.02,
                extra={
                    "classes": PB_CLASSES,
                    "malignant_classes": ("acute_leukemia", "lymphoma", "mds"),
                },
            ),
        ]
        self.path = root / "bundle"

    def write(self, **overrides: object) -> Bundle:
        arguments: dict[str, object] = {
            "name": "tiny",
            "version": "1.0",
            "intended_use": "demo",
            "sources": self.sources,
            "encoder": self.encoder,
            "heads": self.heads,
        }
        arguments.update(overrides)
        return write_bundle(self.path, **arguments)  # type: ignore[arg-type]
