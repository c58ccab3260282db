"""Rewrite the encoder's exported attention blocks as ONNX Runtime's fused ``Attention`` op.

The fp32 export (export/onnx_export.py) writes plain attention, which ORT's transformer
optimizer does not recognise: qkv = x @ W + b, reshaped to (B, S, 3, H, D), transposed,
split into q, k, v, then softmax(q * scale @ k^T) @ v, transposed back and reshaped to
(B, S, H * D). That whole chain is exactly ``com.microsoft.Attention(x, W, b)`` with
``num_heads`` H and the same ``scale`` (W's columns are already q | k | v, heads in
order). Dynamic quantisation turns that op into ``QAttention``, which quantises the qkv
projection and runs the softmax and both attention matmuls in one kernel.

Only blocks that match the pattern exactly are rewritten; the int8 fidelity gate then
judges the result like any other candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_QKV_TRANSPOSE = [2, 0, 3, 1, 4]  # (B, S, 3, H, D) -> (3, B, H, S, D)
_BACK_TRANSPOSE = [0, 2, 1, 3]  # (B, H, S, D) -> (B, S, H, D)


@dataclass(frozen=True)
class _Block:
    nodes: tuple[Any, ...]  # the plain chain, from the qkv MatMul to the final Reshape
    x: str
    weight: str
    bias: str
    output: str
    heads: int
    scale: float


class _Graph:
    """Look-ups over one ONNX graph: producers, consumers, constant values."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        for node in graph.node:  # the exporter shares equal weights through Identity nodes
            if node.op_type == "Identity" and node.input[0] in self.values:
                self.values[node.output[0]] = self.values[node.input[0]]

    def made_by(self, name: str, op_type: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _perm(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _match(g: _Graph, softmax: Any) -> _Block | None:
    """The attention block around ``softmax``, or None when anything differs from the pattern."""
    scores = g.made_by(softmax.input[0], "MatMul")
    context = g.only_consumer(softmax.output[0], "MatMul")
    if scores is None or context is None or context.input[0] != softmax.output[0]:
        return None
    scaled_q = g.made_by(scores.input[0], "Mul")
    k_t = g.made_by(scores.input[1], "Transpose")
    v = g.made_by(context.input[1], "Squeeze")
    back = g.only_consumer(context.output[0], "Transpose")
    if scaled_q is None or k_t is None or v is None or back is None:
        return None
    if _perm(back) != _BACK_TRANSPOSE or _perm(k_t) != [0, 1, 3, 2]:
        return None
    merge = g.only_consumer(back.output[0], "Reshape")
    q, k = g.made_by(scaled_q.input[0], "Squeeze"), g.made_by(k_t.input[0], "Squeeze")
    scale = g.values.get(scaled_q.input[1])
    if merge is None or q is None or k is None or scale is None or scale.size != 1:
        return None
    split = g.made_by(q.input[0], "Split")
    if split is None or [q.input[0], k.input[0], v.input[0]] != list(split.output):
        return None
    heads_first = g.made_by(split.input[0], "Transpose")
    if heads_first is None or _perm(heads_first) != _QKV_TRANSPOSE:
        return None
    unpack = g.made_by(heads_first.input[0], "Reshape")
    biased = g.made_by(unpack.input[0], "Add") if unpack is not None else None
    if unpack is None or biased is None:
        return None
    project = next((m for i in biased.input if (m := g.made_by(i, "MatMul")) is not None), None)
    if project is None:
        return None
    bias = next((i for i in biased.input if i != project.output[0]), "")
    weight = g.values.get(project.input[1])
    head_dim = _head_dim(g, unpack)
    if weight is None or bias not in g.values or weight.ndim != 2 or head_dim is None:
        return None
    hidden = weight.shape[0]
    if weight.shape[1] != 3 * hidden or hidden % head_dim:
        return None
    chain = (project, biased, unpack, heads_first, split, q, k, v, scaled_q, k_t, scores)
    return _Block(
        nodes=(*chain, softmax, context, back, merge),
        x=project.input[0],
        weight=project.input[1],
        bias=bias,
        output=merge.output[0],
        heads=hidden // head_dim,
        scale=float(np.asarray(scale).reshape(())),
    )


def _head_dim(g: _Graph, unpack: Any) -> int | None:
    """D from the (B, S, 3, H, D) reshape: its target's last entry, constant or concatenated."""
    target = g.values.get(unpack.input[1])
    if target is None and (concat := g.made_by(unpack.input[1], "Concat")) is not None:
        target = g.values.get(concat.input[-1])
    if target is None or target.size < 1 or int(target.reshape(-1)[-1]) <= 0:
        return None
    return int(target.reshape(-1)[-1])


def fuse_attention(model: Any) -> int:
    """Rewrite every matching attention block of ``model`` in place; returns how many."""
    from onnx import helper

    graph = model.graph
    g = _Graph(graph)
    blocks = [b for n in graph.node if n.op_type == "Softmax" and (b := _match(g, n)) is not None]
    if not blocks:
        return 0
    replaced = {id(node) for block in blocks for node in block.nodes}
    first = {id(block.nodes[0]): block for block in blocks}
    nodes = []
    for node in graph.node:
        if id(node) in first:
            block = first[id(node)]
            nodes.append(
                helper.make_node(
                    "Attention",
                    [block.x, block.weight, block.bias],
                    [block.output],
                    name=f"{node.name}/fused_attention",
                    domain="com.microsoft",
                    num_heads=block.heads,
                    scale=block.scale,
                )
            )
        elif id(node) not in replaced:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for initialiser in unused:
        graph.initializer.remove(initialiser)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(blocks)


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Drop nodes nothing reads any more (the shape arithmetic the fused chain used)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]
