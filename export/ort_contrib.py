"""onnxruntime's own int8 MatMul with the bias inside, for files that only onnxruntime runs
(``export.onnx`` with ``int8_ops: onnxruntime``; torch-free: onnx + numpy).

Why: onnxruntime fuses a QDQ ``DequantizeLinear -> MatMul <- DequantizeLinear`` into its
``com.microsoft.MatMulIntegerToFloat`` kernel, but leaves the Linear's bias ``Add`` after it as a
separate pass over the output. That kernel takes the bias as its seventh input and adds it while
the output is still in cache; onnxruntime's own fusion that fills it in
(``MatMulIntegerToFloatFusion``: ``MatMulInteger -> Cast -> Mul(Mul(a_scale, b_scale)) -> Add``)
only fires for run-time scales, since constant folding turns static scales' ``Mul`` into a
constant first. ``quantize_dynamic``'s files get the bias fused; static QDQ files do not. On a
6-layer BERT the 36 unfused Adds cost 4-5 % of the int8 latency (measured: bench_hf).

:func:`fuse_matmul_bias` writes those MatMul + Add pairs as the contrib op directly. The values
are the ones onnxruntime computes for the QDQ file (same integer product, same scales; the bias
is added in float either way). :func:`unfuse_matmul_bias` is the exact inverse; tools that need
a file's reference semantics (onnxruntime with graph optimizations off, which must not run
integer kernels) or its QDQ structure read :func:`as_qdq` of it.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper

from .graph import atomic_write_bytes, load_model
from .qdq import QDQGraph, node_axis

__all__ = [
    "CONTRIB_DOMAIN",
    "as_qdq",
    "fuse_matmul_bias",
    "fuse_matmul_bias_file",
    "has_contrib_int8",
    "session_source",
    "unfuse_matmul_bias",
]

CONTRIB_DOMAIN = "com.microsoft"
_OP = "MatMulIntegerToFloat"


def _is_fused(node: onnx.NodeProto) -> bool:
    return node.op_type == _OP and node.domain == CONTRIB_DOMAIN


def has_contrib_int8(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s main graph holds :func:`fuse_matmul_bias`'s contrib nodes."""
    return any(_is_fused(node) for node in model.graph.node)


def fuse_matmul_bias(model: onnx.ModelProto) -> int:
    """Rewrite every ``MatMul(DQ(x_q), DQ(W_q)) + b`` of ``model``'s main graph (in place) as
    ``com.microsoft.MatMulIntegerToFloat(x_q, W_q, s_x, s_W, z_x, z_W, b)``; returns how many.

    Only the pattern onnxruntime's kernel computes as written is taken: ``x`` quantized per
    tensor, ``W`` a 2-D integer initializer quantized per tensor or per output column, ``b`` a
    constant vector with one value per column, and a MatMul output read by that Add alone.
    Anything else (float weights, bias-free or residual Adds, 3-D weights) stays QDQ.
    """
    g = QDQGraph(model.graph)
    outputs = {o.name for o in model.graph.output}
    fused = 0
    for matmul in [n for n in model.graph.node if n.op_type == "MatMul" and not n.domain]:
        found = _match(g, matmul, outputs)
        if found is None:
            continue
        dq_x, dq_w, add, bias = found
        node = helper.make_node(
            _OP,
            [dq_x.input[0], dq_w.input[0], dq_x.input[1], dq_w.input[1],
             _input(dq_x, 2), _input(dq_w, 2), bias],
            [add.output[0]],
            name=matmul.name or add.output[0],
            domain=CONTRIB_DOMAIN,
        )
        # At the Add's place: all of the new node's inputs are produced before the Add.
        nodes = model.graph.node
        position = list(nodes).index(add)
        nodes.insert(position, node)
        g.remove_node(add)
        g.remove_node(matmul)
        for dq in (dq_x, dq_w):
            if (not g.consumers(dq.output[0]) and dq.output[0] not in outputs
                    and dq.output[0] not in g.captured):
                g.remove_node(dq)
        fused += 1
    if fused:
        g.drop_unused_initializers()  # and the shapes recorded for the removed intermediates
        if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return fused


def _match(g: QDQGraph, matmul: onnx.NodeProto, outputs: set[str]
           ) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto, str] | None:
    dq_x, dq_w = g.producer(matmul.input[0]), g.producer(matmul.input[1])
    if not (dq_x is not None and dq_w is not None
            and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
        return None
    if g.const(dq_x.input[0]) is not None or not _per_tensor(g, dq_x):
        return None  # a constant left operand, or per-channel activations: not this kernel
    weight = g.const(dq_w.input[0])
    if weight is None or weight.ndim != 2 or weight.dtype not in (np.int8, np.uint8):
        return None
    if _dtype(g, dq_x) == np.int8 and weight.dtype == np.uint8:
        return None  # the one pair onnxruntime's kernel does not implement
    if not (_per_tensor(g, dq_w) or _per_column(g, dq_w, weight.shape[1])):
        return None
    users = g.consumers(matmul.output[0])
    if (len(users) != 1 or users[0].op_type != "Add" or matmul.output[0] in outputs
            or matmul.output[0] in g.captured):
        return None
    add = users[0]
    bias = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
    value = g.const(bias)
    if value is None or value.dtype != np.float32 or value.shape != (weight.shape[1],):
        return None
    return dq_x, dq_w, add, bias


def _per_tensor(g: QDQGraph, dq: onnx.NodeProto) -> bool:
    scale = g.const(dq.input[1])
    return scale is not None and scale.size == 1


def _per_column(g: QDQGraph, dq: onnx.NodeProto, columns: int) -> bool:
    scale = g.const(dq.input[1])
    return (scale is not None and scale.shape == (columns,)
            and node_axis(dq) in (1, -1))


def _dtype(g: QDQGraph, dq: onnx.NodeProto) -> type:
    """The integer type a DequantizeLinear reads (its zero point's; uint8 without one)."""
    zero_point = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    return zero_point.dtype.type if zero_point is not None else np.uint8


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def unfuse_matmul_bias(model: onnx.ModelProto) -> int:
    """Write every ``com.microsoft.MatMulIntegerToFloat`` of ``model``'s main graph (in place)
    back as ``DequantizeLinear`` x2 -> ``MatMul`` (-> ``Add`` of the bias); returns how many.
    The inverse of :func:`fuse_matmul_bias`: only nodes of the form it writes (per-tensor A,
    2-D integer B scaled per tensor or per column) are rewritten; others stay as they are."""
    g = QDQGraph(model.graph)
    nodes = model.graph.node
    count = 0
    for fused in [n for n in nodes if _is_fused(n) and _written_by_fuse(g, n)]:
        a, b, a_scale, b_scale = fused.input[:4]
        a_zp, b_zp, bias = (_input(fused, i) for i in (4, 5, 6))
        stem = g.unique(fused.name or fused.output[0])
        a_float, b_float = g.unique(f"{stem}_A_dequantized"), g.unique(f"{stem}_B_dequantized")
        product = g.unique(f"{stem}_product") if bias else fused.output[0]
        new = [
            helper.make_node("DequantizeLinear", [a, a_scale, a_zp] if a_zp else [a, a_scale],
                             [a_float], name=a_float, axis=-1),
            helper.make_node("DequantizeLinear", [b, b_scale, b_zp] if b_zp else [b, b_scale],
                             [b_float], name=b_float, axis=1),
            helper.make_node("MatMul", [a_float, b_float], [product], name=stem),
        ]
        if bias:
            new.append(helper.make_node("Add", [product, bias], [fused.output[0]],
                                        name=f"{stem}_bias"))
        position = list(nodes).index(fused)
        g.remove_node(fused)
        for offset, node in enumerate(new):
            nodes.insert(position + offset, node)
        count += 1
    return count


def _written_by_fuse(g: QDQGraph, node: onnx.NodeProto) -> bool:
    a_scale, weight, b_scale = g.const(node.input[2]), g.const(node.input[1]), g.const(
        node.input[3])
    if a_scale is None or a_scale.size != 1 or weight is None or weight.ndim != 2:
        return False
    return b_scale is not None and (b_scale.size == 1 or b_scale.shape == (weight.shape[1],))


def as_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when it holds no contrib int8 nodes, else an unfused copy: the form
    whose unoptimized run is the file's reference semantics and whose DequantizeLinear nodes
    name every integer weight."""
    if not has_contrib_int8(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    unfuse_matmul_bias(copy)
    return copy


def fuse_matmul_bias_file(path: str | os.PathLike) -> int:
    """:func:`fuse_matmul_bias` on the file at ``path``, rewritten atomically (untouched when
    nothing matches); returns how many MatMuls now carry their bias."""
    model = load_model(path)
    fused = fuse_matmul_bias(model)
    if fused:
        onnx.checker.check_model(model)
        atomic_write_bytes(path, model.SerializeToString())
    return fused


def session_source(path: str | os.PathLike, *, optimize: bool) -> str | bytes:
    """What to hand ``onnxruntime.InferenceSession`` for the file at ``path``: the path itself,
    except for the reference run (``optimize=False``: graph optimizations off) of a file with
    contrib int8 nodes, whose kernels would run integer products even there: then the
    serialized :func:`as_qdq` form."""
    if optimize:
        return str(path)
    model = load_model(path)
    return str(path) if not has_contrib_int8(model) else as_qdq(model).SerializeToString()
