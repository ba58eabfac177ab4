"""Rewrites of an exported graph into forms onnxruntime fuses (torch-free: onnx + numpy).

:func:`fusable_gelu`: torch's exporter writes the exact GELU ``x * Φ(x)`` as
``x * (0.5 * (1 + erf(x / sqrt 2)))``. onnxruntime's GELU fusion knows ``(x * 0.5) * (1 + erf(...))``
and ``(x * (1 + erf(...))) * 0.5`` but not this grouping, so every GELU ran as five ops (Div,
Erf, Add, Mul, Mul), and the Linear's bias before it as a sixth. Regrouped, onnxruntime runs one
``BiasGelu`` (bias add and GELU in one pass) or ``Gelu``. The value is the same product,
multiplied in another order (float rounding only).
"""

from __future__ import annotations

import numpy as np
import onnx

from .qdq import QDQGraph

__all__ = ["fusable_gelu"]


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
        return users[0] if len(users) == 1 else None

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
