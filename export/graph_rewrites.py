"""Rewrites of an exported graph into forms onnxruntime fuses (torch-free: onnx + numpy).

:func:`fusable_gelu`: torch's exporter writes the exact GELU ``x * Φ(x)`` as
``x * (0.5 * (1 + erf(x / sqrt 2)))``. onnxruntime's GELU fusion knows ``(x * 0.5) * (1 + erf(...))``
and ``(x * (1 + erf(...))) * 0.5`` but not this grouping, so every GELU ran as five ops (Div,
Erf, Add, Mul, Mul), and the Linear's bias before it as a sixth. Regrouped, onnxruntime runs one
``BiasGelu`` (bias add and GELU in one pass) or ``Gelu``. The value is the same product,
multiplied in another order (float rounding only).

:func:`fold_scale_into_layernorm`: a SmoothQuant divisor is a per-channel ``Mul`` before the
smoothed Linears' QuantizeLinear (one pass over the activation per smoothed input). Where that
input is a LayerNorm's output read by nothing else (pre-LN transformers: ViT, GPT-2, Llama-style),
``LN(x; g, b) * c = LN(x; g * c, b * c)``: the divisor becomes part of the LayerNorm's affine
weights, which is how Xiao et al. (2023, sec. 4) deploy it, and the Mul is gone. (Post-LN BERT
reads the LayerNorm's output in the residual too, so its Muls stay.)
"""

from __future__ import annotations

import numpy as np
import onnx

from .qdq import QDQGraph

__all__ = ["fold_scale_into_layernorm", "fusable_gelu"]


def fusable_gelu(model: onnx.ModelProto) -> int:
    """Regroup every ``x * (0.5 * (1 + erf(x / c)))`` of ``model``'s main graph (in place) as
    ``(x * 0.5) * (1 + erf(x / c))``; returns how many. Only the pattern's own single-consumer
    intermediates are touched; anything else read by another node is left as it is."""
    graph = model.graph
    g = QDQGraph(graph)  # the QDQ rewrite's lookups: constants, producers, consumers

    def scalar(name: str) -> float | None:
        value = g.const(name)
        return float(value) if value is not None and np.size(value) == 1 else None

    def only_user(name: str) -> onnx.NodeProto | None:
        users = g.consumers(name)
        return users[0] if len(users) == 1 and name not in g.captured else None

    outputs = {o.name for o in graph.output}
    rewritten = 0
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = g.producer(erf.input[0])
        if div is None or div.op_type != "Div" or not np.isclose(scalar(div.input[1]) or 0.0,
                                                                   np.sqrt(2.0)):
            continue
        x = div.input[0]
        add = only_user(erf.output[0])
        if add is None or add.op_type != "Add" or scalar(_other(add, erf.output[0])) != 1.0:
            continue
        half = only_user(add.output[0])
        if half is None or half.op_type != "Mul" or scalar(_other(half, add.output[0])) != 0.5:
            continue
        outer = only_user(half.output[0])
        if outer is None or outer.op_type != "Mul" or _other(outer, half.output[0]) != x:
            continue
        if {add.output[0], half.output[0]} & outputs:
            continue
        half_name = _other(half, add.output[0])
        half.input[:] = [x, half_name]  # x * 0.5: x is produced before the Div, so order holds
        outer.input[:] = [half.output[0], add.output[0]]
        rewritten += 1
    return rewritten


def _other(node: onnx.NodeProto, name: str) -> str:
    """The input of a two-input ``node`` that is not ``name`` (``name`` itself if both are)."""
    first, second = node.input[0], node.input[1]
    return second if first == name else first


def fold_scale_into_layernorm(model: onnx.ModelProto) -> int:
    """Fold every constant per-channel ``Mul`` of ``model``'s main graph whose other input is a
    ``LayerNormalization`` output read by that Mul alone into the LayerNorm's scale and bias (in
    place); returns how many. The LayerNorm must normalize the last axis and the factor be a
    vector with one value per channel of it, or one value."""
    graph = model.graph
    g = QDQGraph(graph)
    outputs = {o.name for o in graph.output}
    folded = 0
    for mul in [n for n in graph.node if n.op_type == "Mul" and not n.domain]:
        norm = next((p for p in map(g.producer, mul.input)
                     if p is not None and p.op_type == "LayerNormalization" and not p.domain), None)
        if norm is None or not _folds(g, norm, mul, outputs):
            continue
        factor = g.const(_other(mul, norm.output[0])).astype(np.float32).reshape(-1)
        gamma = g.const(norm.input[1]).astype(np.float32)
        inputs = [norm.input[0], g.add_initializer(gamma * factor, f"{norm.input[1]}_smoothed")]
        if len(norm.input) > 2 and norm.input[2]:
            beta = g.const(norm.input[2]).astype(np.float32)
            inputs.append(g.add_initializer(beta * factor, f"{norm.input[2]}_smoothed"))
        norm.input[:] = inputs
        g.forget_shape(norm.output[0])
        norm.output[0] = mul.output[0]  # the Mul was its only reader: the LayerNorm is it now
        g.remove_node(mul)
        folded += 1
    if folded:
        g.drop_unused_initializers()
    return folded


def _folds(g: QDQGraph, norm: onnx.NodeProto, mul: onnx.NodeProto, outputs: set[str]) -> bool:
    y = norm.output[0]
    if (len(g.consumers(y)) != 1 or y in outputs or any(o for o in norm.output[1:])
            or y in g.captured):
        return False
    if next((a.i for a in norm.attribute if a.name == "axis"), -1) != -1:
        return False
    factor, gamma = g.const(_other(mul, y)), g.const(norm.input[1])
    if factor is None or gamma is None or gamma.ndim != 1 or factor.dtype != np.float32:
        return False
    # A factor of higher rank would broadcast the product to more dimensions than the
    # LayerNorm's output has: folded, that dimension would be lost.
    return factor.ndim <= 1 and factor.size in (1, gamma.shape[0])
