"""Turn a traced quantize/dequantize ONNX graph into a deployable int8 QDQ model, and inspect one.

The PyTorch side (:func:`slimline.compress.quant.export_qdq_onnx`) traces the fake-quant model so that
every quantized activation is a ``QuantizeLinear -> DequantizeLinear`` pair and every quantized
weight is ``float initializer -> QuantizeLinear (-> Clip) -> DequantizeLinear``, all with the
scales and zero points PyTorch used. :func:`finalize_qdq` then rewrites it into the layout ONNX
Runtime fuses into integer kernels (QLinearConv, QGemm, QLinearMatMul/MatMulIntegerToFloat,
QLinearAdd):

1. constant ``QuantizeLinear (-> Clip)`` on a weight initializer is evaluated once: the file
   stores int8 weights feeding ``DequantizeLinear`` (4x smaller; zeros stay exactly 0);
2. a ``Transpose`` between a weight's DequantizeLinear and its MatMul is folded into the int8
   initializer (the DequantizeLinear's axis follows), so the DQ feeds the MatMul directly;
3. the float bias of a Conv/Gemm whose input and weight are dequantized is stored as int32 on
   the grid ``scale_x * scale_w`` with its own DequantizeLinear (the fused kernels add it to the
   int32 accumulator; a float bias would block the fusion).

Torch-free (onnx + numpy). Reading a QDQ file back, and what onnxruntime makes of it, is
:mod:`slimline.export.qdq_inspect`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import atomic_write_bytes, load_model

__all__ = ["QDQError", "finalize_qdq", "write_qdq"]

class QDQError(ValueError):
    """The graph is not the quantize/dequantize graph the rewrite expects (names the node)."""


@dataclass
class QDQGraph:
    """Lookup tables over a graph that the rewrite keeps up to date."""

    graph: onnx.GraphProto
    inits: dict[str, onnx.TensorProto] = field(init=False)
    captured: set[str] = field(init=False)
    constants: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.inits = {t.name: t for t in self.graph.initializer}
        # Names an If/Loop/Scan body reads from this graph: consumers() does not see those
        # readers, so a rewrite must leave these tensors as they are.
        self.captured = _subgraph_reads(self.graph)
        self.constants = {}
        for node in self.graph.node:  # Constant nodes hold scales in some exporter versions
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return self.constants.get(name)

    def producer(self, name: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if name in n.output), None)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if name in n.input]

    def rename_input(self, old: str, new: str) -> None:
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        name = self.unique(name)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.graph.initializer[-1]  # append copies: keep the stored one
        return name

    def unique(self, name: str) -> str:
        taken = set(self.inits) | {o for n in self.graph.node for o in n.output}
        candidate, i = name, 1
        while candidate in taken:
            candidate, i = f"{name}_{i}", i + 1
        return candidate

    def remove_node(self, node: onnx.NodeProto) -> None:
        self.graph.node.remove(node)

    def forget_shape(self, name: str) -> None:
        for info in [v for v in self.graph.value_info if v.name == name]:
            self.graph.value_info.remove(info)

    def drop_unused_initializers(self) -> None:
        used = ({i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
                | self.captured)
        for tensor in [t for t in self.graph.initializer if t.name not in used]:
            self.graph.initializer.remove(tensor)
            self.inits.pop(tensor.name, None)
        produced = {o for n in self.graph.node for o in n.output}
        for info in [v for v in self.graph.value_info if v.name not in produced]:
            self.graph.value_info.remove(info)  # shapes of tensors the rewrite removed


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of a subgraph (at any depth) of ``graph``'s nodes."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                names.update(i for n in body.node for i in n.input)
                names.update(o.name for o in body.output)
                names |= _subgraph_reads(body)
    return names


def _quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int, dtype: type
) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)`` in float32."""
    shape = [1] * x.ndim
    if scale.ndim:
        shape[axis % x.ndim] = -1
    scale = scale.astype(np.float32).reshape(shape)
    zero_point = zero_point.astype(np.float32).reshape(shape if zero_point.ndim else [])
    info = np.iinfo(dtype)
    q = np.rint(x.astype(np.float32) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def node_axis(node: onnx.NodeProto, default: int = 1) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), default)


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for attr in node.attribute:
        if attr.name == "axis":
            attr.i = axis
            return
    node.attribute.append(helper.make_attribute("axis", axis))


def _int_name(name: str) -> str:
    """``conv.parametrizations.weight.original`` (torch parametrization) -> ``conv.weight``."""
    if ".parametrizations." in name and name.endswith(".original"):
        owner, _, rest = name.partition(".parametrizations.")
        name = f"{owner}.{rest.split('.')[0]}"
    return f"{name}_quantized"


def _fold_constant_quantize(g: QDQGraph) -> int:
    """Step 1: ``initializer -> QuantizeLinear (-> Clip)`` becomes an integer initializer."""
    folded = 0
    for node in [n for n in g.graph.node if n.op_type == "QuantizeLinear"]:
        x = g.const(node.input[0])
        if x is None or not np.issubdtype(x.dtype, np.floating):
            continue
        scale = g.const(node.input[1])
        # No zero point input means uint8 with zero point 0 (the ONNX default).
        has_zero_point = len(node.input) > 2 and node.input[2]
        zero_point = g.const(node.input[2]) if has_zero_point else np.zeros((), np.uint8)
        if scale is None or zero_point is None:
            raise QDQError(
                f"QuantizeLinear {node.name or node.output[0]!r}: non-constant scale "
                "or zero point on a constant weight"
            )
        q = _quantize(x, scale, zero_point, node_axis(node), zero_point.dtype.type)
        output, removed = node.output[0], [node]
        users = g.consumers(output)
        if len(users) == 1 and users[0].op_type == "Clip":
            clip = users[0]
            low = g.const(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
            high = g.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
            q = np.clip(
                q, low if low is not None else q.min(), high if high is not None else q.max()
            ).astype(q.dtype)
            output = clip.output[0]
            removed.append(clip)
        name = g.add_initializer(q, _int_name(node.input[0]))
        for dead in removed:
            g.remove_node(dead)
        g.rename_input(output, name)
        folded += 1
    return folded


def _fold_weight_transposes(g: QDQGraph) -> int:
    """Step 2: ``int initializer -> DQ -> Transpose`` becomes ``transposed initializer -> DQ``."""
    folded = 0
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear"]:
        if dq.input[0] not in g.inits:
            continue
        users = g.consumers(dq.output[0])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        transpose = users[0]
        if len(g.consumers(dq.input[0])) != 1:
            continue  # the int8 tensor is shared: leave it
        q = numpy_helper.to_array(g.inits[dq.input[0]])
        perm = next(
            (list(a.ints) for a in transpose.attribute if a.name == "perm"),
            list(reversed(range(q.ndim))),
        )
        g.inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.transpose(q, perm), dq.input[0]))
        scale = g.const(dq.input[1])
        if scale is not None and scale.ndim:  # per-axis: the channel axis moves with the data
            _set_axis(dq, perm.index(node_axis(dq) % q.ndim))
        g.remove_node(transpose)
        g.rename_input(transpose.output[0], dq.output[0])
        g.forget_shape(dq.output[0])  # its recorded shape is the untransposed one
        folded += 1
    return folded


def _quantize_biases(g: QDQGraph) -> tuple[int, float]:
    """Step 3: float Conv/Gemm biases -> int32 on ``scale_x * scale_w`` + DequantizeLinear."""
    count, worst = 0, 0.0
    for node in [n for n in g.graph.node if n.op_type in ("Conv", "Gemm")]:
        if len(node.input) < 3 or not node.input[2]:
            continue
        bias = g.const(node.input[2])
        dq_x, dq_w = g.producer(node.input[0]), g.producer(node.input[1])
        if bias is None or bias.dtype != np.float32 or bias.ndim != 1 or not dq_x or not dq_w:
            continue
        if dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        scale_x, scale_w = g.const(dq_x.input[1]), g.const(dq_w.input[1])
        if scale_x is None or scale_w is None or scale_x.size != 1:
            continue
        if scale_w.size not in (1, bias.size):
            continue  # weight scales along another axis than the output channels
        scale = (
            (scale_x.astype(np.float32).reshape(()) * scale_w.astype(np.float32))
            .astype(np.float32)
            .reshape(-1)
        )
        levels = np.rint(bias / scale)
        if np.abs(levels).max(initial=0) >= 2**31 - 1:
            raise QDQError(
                f"{node.op_type} {node.name or node.output[0]!r}: bias overflows int32 "
                "on the input x weight scale grid"
            )
        q = levels.astype(np.int32)
        worst = max(worst, float(np.abs(q.astype(np.float32) * scale - bias).max(initial=0)))
        base = node.input[2]
        q_name = g.add_initializer(q, f"{base}_quantized")
        scale_name = g.add_initializer(
            scale if scale.size > 1 else scale.reshape(()), f"{base}_scale"
        )
        zp_name = g.add_initializer(
            np.zeros(scale.shape if scale.size > 1 else (), np.int32), f"{base}_zero_point"
        )
        out = g.unique(f"{base}_dequantized")
        dq = helper.make_node(
            "DequantizeLinear", [q_name, scale_name, zp_name], [out], name=out, axis=0
        )
        g.graph.node.insert(0, dq)  # reads initializers only: first is topologically fine
        node.input[2] = out
        count += 1
    return count, worst


def finalize_qdq(model: onnx.ModelProto) -> dict[str, Any]:
    """Rewrite a traced QDQ model in place (steps 1-3 of the module docstring), dropping the
    exporter's per-node provenance metadata (stack traces with local paths, module scopes).

    Returns counts of what was done and ``bias_max_error``, the largest difference between a
    float bias and its int32 value (0 when the PyTorch side put the biases on that grid).
    """
    g = QDQGraph(model.graph)
    weights = _fold_constant_quantize(g)
    transposes = _fold_weight_transposes(g)
    biases, bias_error = _quantize_biases(g)
    g.drop_unused_initializers()
    for node in g.graph.node:  # exporter provenance (stack traces, local paths): not for deployment
        del node.metadata_props[:]
    leftover = [
        n.name or n.output[0]
        for n in g.graph.node
        if n.op_type == "QuantizeLinear" and g.const(n.input[0]) is not None
    ]
    if leftover:
        raise QDQError(f"QuantizeLinear on constants left after folding: {leftover[:5]}")
    return {
        "weights_folded": weights,
        "transposes_folded": transposes,
        "biases_quantized": biases,
        "bias_max_error": bias_error,
    }


def write_qdq(
    traced_path: str | os.PathLike,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    fuse_bias: bool = False,
) -> dict[str, Any]:
    """Load a traced QDQ model, :func:`finalize_qdq` it (then, with ``fuse_bias``,
    :func:`~slimline.export.ort_contrib.fuse_matmul_bias`: ``contrib_matmuls`` in the report),
    add ``metadata`` to its ``metadata_props``, check it and write it atomically."""
    model = load_model(traced_path)
    report = finalize_qdq(model)
    if fuse_bias:
        from .ort_contrib import fuse_matmul_bias  # it imports this module

        report["contrib_matmuls"] = fuse_matmul_bias(model)
    if metadata:
        helper.set_model_props(model, {**_props(model), **metadata})
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())
    return report


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}
