"""What is in an int8 QDQ file, and what onnxruntime runs for it (torch-free): the weights and
activations it quantizes (:func:`qdq_summary`) and the op types of onnxruntime's optimized graph
(:func:`ort_optimized_op_counts`, against :data:`INT8_KERNEL_OPS` / :data:`FLOAT_KERNEL_OPS`)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import load_model
from .ort_contrib import as_qdq
from .qdq import QDQGraph, node_axis

__all__ = [
    "FLOAT_KERNEL_OPS",
    "INT8_KERNEL_OPS",
    "QDQSummary",
    "ort_optimized_op_counts",
    "qdq_summary",
]

# Ops in ONNX Runtime's optimized graph that compute in integers ("com.microsoft." = contrib).
_CONTRIB_INT8 = ("QLinearConv", "QLinearAdd", "QLinearMul", "QGemm", "MatMulIntegerToFloat",
                 "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
                 "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu", "QAttention",
                 "DynamicQuantizeMatMul")  # fmt: skip
INT8_KERNEL_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
    | {f"com.microsoft.{op}" for op in _CONTRIB_INT8}
)
# Ops that do the heavy lifting in float: what is left unfused.
FLOAT_KERNEL_OPS = frozenset(
    {"Conv", "Gemm", "MatMul", "com.microsoft.nchwc.Conv"}
    | {f"com.microsoft.{op}" for op in ("FusedConv", "FusedGemm", "FusedMatMul")}
)


@dataclass
class QDQSummary:
    """What is quantized in a QDQ model.

    ``activations``: one entry per QuantizeLinear on a computed tensor (input tensor name, scale,
    zero point, dtype). ``weights``: one entry per integer initializer read by a
    DequantizeLinear (shape, axis, scales, zero points, number of distinct levels, zeros — a
    level equal to the zero point — and the integer min/max). ``weight_sparsity`` is zeros over
    all integer weight values of rank >= 2. ``float_weights`` lists float initializers of rank
    >= 2 still read directly by Conv/Gemm/MatMul (layers left in float).
    """

    quantize_nodes: int
    dequantize_nodes: int
    activations: list[dict[str, Any]]
    weights: dict[str, dict[str, Any]]
    int32_biases: int
    weight_sparsity: float
    float_weights: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def qdq_summary(model: onnx.ModelProto | str | os.PathLike) -> QDQSummary:
    """Summarise the QDQ structure of ``model`` (a proto or a path; contrib int8 MatMuls count
    as their QDQ form, :func:`~slimline.export.ort_contrib.as_qdq`)."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    model = as_qdq(model)
    g = QDQGraph(model.graph)
    activations, weights, biases = [], {}, 0
    zeros = total = 0
    for node in g.graph.node:
        if node.op_type == "QuantizeLinear" and g.const(node.input[0]) is None:
            scale, zero_point = g.const(node.input[1]), g.const(node.input[2])
            activations.append(
                {
                    "tensor": node.input[0],
                    "scale": scale.tolist(),
                    "zero_point": zero_point.tolist(),
                    "dtype": str(zero_point.dtype),
                }
            )
        if node.op_type == "DequantizeLinear" and node.input[0] in g.inits:
            q = numpy_helper.to_array(g.inits[node.input[0]])
            if q.dtype == np.int32:
                biases += 1
                continue
            zero_point = g.const(node.input[2]) if len(node.input) > 2 else np.zeros((), q.dtype)
            axis = node_axis(node) if g.const(node.input[1]).ndim else None
            shape = [1] * q.ndim
            if axis is not None:
                shape[axis] = -1
            is_zero = q == zero_point.reshape(shape if zero_point.ndim else [])
            if q.ndim >= 2:
                zeros, total = zeros + int(is_zero.sum()), total + q.size
            weights[node.input[0]] = {
                "dtype": str(q.dtype),
                "shape": list(q.shape),
                "axis": axis,
                "scale": g.const(node.input[1]).tolist(),
                "zero_point": zero_point.tolist(),
                "levels": int(np.unique(q).size),
                "zeros": int(is_zero.sum()),
                "min": int(q.min()),
                "max": int(q.max()),
            }
    float_weights = sorted(
        {
            name
            for n in g.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul")
            for name in n.input[1:2]
            if name in g.inits
            and g.inits[name].data_type == onnx.TensorProto.FLOAT
            and len(g.inits[name].dims) >= 2
        }
    )
    ops = Counter(n.op_type for n in g.graph.node)
    return QDQSummary(
        quantize_nodes=ops["QuantizeLinear"],
        dequantize_nodes=ops["DequantizeLinear"],
        activations=activations,
        weights=weights,
        int32_biases=biases,
        weight_sparsity=zeros / total if total else 0.0,
        float_weights=float_weights,
    )


def ort_optimized_op_counts(
    path: str | os.PathLike, *, graph_optimization: str = "all"
) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime (CPU) actually runs after its optimizations, read
    back through ``SessionOptions.optimized_model_filepath``. Contrib ops are keyed
    ``"com.microsoft.OpType"``; compare with :data:`INT8_KERNEL_OPS` / :data:`FLOAT_KERNEL_OPS`.
    """
    import onnxruntime as ort  # deferred: importing onnxruntime costs ~0.3 s

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[graph_optimization]
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(optimized), load_external_data=False)
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        counts[f"{domain}.{node.op_type}" if domain else node.op_type] += 1
    return dict(sorted(counts.items()))
