"""Is an int8 ONNX file computed exactly on a CPU, and if not, where does it first go wrong?
(torch-free: onnx, onnxruntime, numpy)

* :func:`int8_weight_ranges` reads the stored integer weight levels of every quantized
  Conv/Gemm/MatMul (QDQ, QOperator or dynamic format) and the kernel kind that runs it;
  :func:`saturating_weights` lists those a :class:`~slimline.export.target.Target` cannot
  compute exactly (see :mod:`slimline.export.target` for why).
* :func:`first_divergence` runs the file twice in onnxruntime: with all graph optimizations (the
  fused integer kernels a deployment runs) and with none (every QuantizeLinear/DequantizeLinear
  executed as written around float ops: the file's reference semantics). It compares every
  quantized activation, in graph order, in units of quantization levels, and returns the first
  one that differs by more than requantization rounding explains.
* :func:`explain_int8_mismatch` turns that into a message that names the node and, when it
  matches the u8s8 saturation signature, the setting that fixes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import load_model
from .ort_contrib import as_qdq
from .target import Target, WeightKernel, target_for_machine

__all__ = [
    "Divergence",
    "exact_on",
    "WeightRange",
    "explain_int8_mismatch",
    "first_divergence",
    "int8_weight_ranges",
    "saturating_weights",
    "weight_kernel",
]

# Requantization in fused kernels rounds once, the reference path twice (float, then Q): a level
# or two of difference is expected; saturation and wrong kernels give tens of levels.
DIVERGENCE_LEVELS = 3
# Both sessions run the whole graph, so a layer's inputs already differ by those one-level
# roundings, and deep layers sum them into a few values a little further off (MobileNetV2 on an
# AVX-512 VNNI CPU: 2 of 65,536 values 4-5 levels off at its 18th activation, nothing upstream
# beyond 3). Wrong kernels move a sizeable share of a tensor, and saturation moves values by
# tens of levels, so a tensor diverges when more than DIVERGENCE_FRACTION of its values is
# beyond DIVERGENCE_LEVELS, or any value is beyond SATURATION_LEVELS (even a single one).
DIVERGENCE_FRACTION = 1e-3
SATURATION_LEVELS = 12


@dataclass(frozen=True)
class WeightRange:
    """One quantized layer's stored weight levels."""

    node: str  # name of the Conv/Gemm/MatMul (or QLinearConv, MatMulInteger, ...) node
    op_type: str
    weight: str  # the integer initializer
    kernel: WeightKernel
    dtype: str  # "int8" or "uint8" (u8u8 kernels widen to int16 first: never saturate)
    max_level: int  # max |q| of the stored integers


@dataclass(frozen=True)
class Divergence:
    """The first quantized activation where the fused kernels and the reference differ."""

    tensor: str
    producer: str  # "OpType name" of the compute node that feeds this QuantizeLinear
    producer_name: str
    layer: str  # the producer's weight as PyTorch names it ("layer1.0.conv1.weight"), or ""
    max_levels: int  # largest difference, in quantization levels
    fraction_off: float  # share of elements off by more than DIVERGENCE_LEVELS
    checked: int  # quantized activations compared (this one included)

    def __str__(self) -> str:
        weight = f" (weight {self.layer})" if self.layer else ""
        return (
            f"tensor {self.tensor!r} after {self.producer}{weight}: up to {self.max_levels} "
            "levels off, "
            f"{self.fraction_off:.1%} of its values beyond {DIVERGENCE_LEVELS} levels"
        )


def weight_kernel(op_type: str, weight_shape: Sequence[int], group: int = 1) -> WeightKernel:
    """Which onnxruntime kernel runs a quantized layer: ``depthwise`` for a 2-D Conv with one
    input and one output channel per group (its own int32 kernel), else ``gemm``. 1-D depthwise
    convs count as ``gemm``: the conservative choice, exact either way at 7 bits."""
    if (
        op_type in ("Conv", "QLinearConv", "ConvInteger")
        and len(weight_shape) == 4
        and group > 1
        and weight_shape[1] == 1
        and weight_shape[0] == group
    ):
        return "depthwise"
    return "gemm"


# (op type, index of its integer weight input) for formats that store it on the node itself.
_QOPERATOR_WEIGHT = {"QLinearConv": 3, "QLinearMatMul": 3, "ConvInteger": 1, "MatMulInteger": 1,
                     "MatMulIntegerToFloat": 1}
_FLOAT_COMPUTE = ("Conv", "Gemm", "MatMul")


def int8_weight_ranges(model: onnx.ModelProto | str | os.PathLike) -> list[WeightRange]:
    """Stored weight levels of every integer-weight Conv/Gemm/MatMul in ``model``."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    produced = {out: node for node in graph.node for out in node.output}
    found = []

    def integer(name: str) -> np.ndarray | None:
        if name not in inits:
            return None
        array = numpy_helper.to_array(inits[name])
        return array if array.dtype in (np.int8, np.uint8) else None

    for node in graph.node:
        weight_name, q = None, None
        if node.op_type in _FLOAT_COMPUTE and len(node.input) > 1:
            dq = produced.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                weight_name, q = dq.input[0], integer(dq.input[0])
        elif node.op_type in _QOPERATOR_WEIGHT and len(node.input) > _QOPERATOR_WEIGHT[node.op_type]:
            weight_name = node.input[_QOPERATOR_WEIGHT[node.op_type]]
            q = integer(weight_name)
        if q is None or weight_name is None:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        found.append(
            WeightRange(
                node=node.name or node.output[0],
                op_type=node.op_type,
                weight=weight_name,
                kernel=weight_kernel(node.op_type, q.shape, group),
                dtype=str(q.dtype),
                max_level=int(np.abs(q.astype(np.int32)).max(initial=0)),
            )
        )
    return found


def saturating_weights(
    ranges: Sequence[WeightRange], target: Target
) -> list[WeightRange]:
    """The int8 (signed) weights ``target``'s kernels would not compute exactly."""
    scheme = target.scheme
    return [
        r for r in ranges if r.dtype == "int8" and r.max_level > scheme.weight_level(r.kernel)
    ]


def exact_on(path: str | os.PathLike, target: Target | None = None) -> bool:
    """Whether ``target``'s (default: this machine's) onnxruntime kernels compute the int8
    weights of the file at ``path`` exactly (always true for a float file)."""
    if target is None:
        from .machine import machine_info

        target = target_for_machine(machine_info())
    return not saturating_weights(int8_weight_ranges(path), target)


def _session(model: onnx.ModelProto, optimize: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )


def reference_outputs(
    path: str | os.PathLike, feed: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """The file's outputs computed as written (no graph optimizations, so no fused integer
    kernels): what the QDQ graph means, independent of this CPU's int8 instructions."""
    return _session(as_qdq(load_model(path)), optimize=False).run(None, dict(feed))


def first_divergence(
    path: str | os.PathLike, feed: Mapping[str, np.ndarray]
) -> Divergence | None:
    """The first quantized activation (graph order) where onnxruntime's fused integer kernels
    and the file's reference semantics differ by more than :data:`DIVERGENCE_LEVELS` levels in
    more than :data:`DIVERGENCE_FRACTION` of its values, or by more than
    :data:`SATURATION_LEVELS` anywhere;
    ``None`` when every one agrees (or the file quantizes no activation)."""
    model = load_model(path)
    graph = model.graph
    const = {t.name for t in graph.initializer}
    produced = {out: node for node in graph.node for out in node.output}
    points = [
        node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in const
    ]
    if not points:
        return None
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    for node in points:
        if node.output[0] in outputs:
            continue
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        elem = zero_point.data_type if zero_point is not None else onnx.TensorProto.UINT8
        graph.output.append(helper.make_tensor_value_info(node.output[0], elem, None))
    names = [o.name for o in graph.output]
    fused = dict(zip(names, _session(model, optimize=True).run(names, dict(feed))))
    reference = dict(zip(names, _session(as_qdq(model), optimize=False).run(names, dict(feed))))
    for checked, node in enumerate(points, start=1):
        name = node.output[0]
        diff = np.abs(fused[name].astype(np.int32) - reference[name].astype(np.int32))
        worst = int(diff.max(initial=0))
        beyond = float((diff > DIVERGENCE_LEVELS).mean()) if diff.size else 0.0
        if beyond > DIVERGENCE_FRACTION or worst > SATURATION_LEVELS:
            source = _compute_producer(node, produced)
            return Divergence(
                tensor=name,
                producer=f"{source.op_type} {source.name or source.output[0]!r}" if source else "?",
                producer_name=(source.name or source.output[0]) if source else "",
                layer=_weight_of(source, produced) if source else "",
                max_levels=worst,
                fraction_off=beyond,
                checked=checked,
            )
    return None


def _compute_producer(
    quantize: onnx.NodeProto, produced: Mapping[str, onnx.NodeProto]
) -> onnx.NodeProto | None:
    """The Conv/Gemm/MatMul/Add... whose output this QuantizeLinear quantizes, looking through
    elementwise activations (Relu, Clip) that onnxruntime fuses into it."""
    node = produced.get(quantize.input[0])
    while node is not None and node.op_type in ("Relu", "Clip", "LeakyRelu") and node.input:
        upstream = produced.get(node.input[0])
        if upstream is None or upstream.op_type == "DequantizeLinear":
            break
        node = upstream
    return node


def _weight_of(node: onnx.NodeProto, produced: Mapping[str, onnx.NodeProto]) -> str:
    """``conv1.weight`` for a Conv reading ``DequantizeLinear(conv1.weight_quantized)``."""
    if len(node.input) < 2:
        return ""
    dq = produced.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return ""
    return dq.input[0].removesuffix("_quantized")


def explain_int8_mismatch(
    path: str | os.PathLike,
    feed: Mapping[str, np.ndarray],
    *,
    machine: Mapping[str, Any],
) -> str:
    """Why onnxruntime's int8 result for ``path`` differs from what the file means, in one
    paragraph: the first diverging node, and the u8s8 saturation signature and its fix when
    that node's weights exceed what this machine computes exactly."""
    here = target_for_machine(machine)
    divergence = first_divergence(path, feed)
    if divergence is None:
        return (
            f"onnxruntime's fused int8 kernels agree with the file's QDQ reference on every "
            f"quantized activation here ({here.name}); the difference comes from the float "
            "model itself (compare the ONNX file with PyTorch's fake-quant model)"
        )
    text = f"the int8 result first diverges at {divergence}"
    over = {r.node: r for r in saturating_weights(int8_weight_ranges(path), here)}
    culprit = over.get(divergence.producer_name)
    if culprit is not None or (over and here.saturates_u8s8):
        shown = culprit or next(iter(over.values()))
        text += (
            f". This matches u8s8 saturation: {shown.op_type} of {shown.weight.removesuffix('_quantized')!r} stores int8 "
            f"weights up to |{shown.max_level}| ({len(over)} such layers), and this CPU "
            f"({machine.get('cpu', 'unknown')}, {here.description}) adds pairs of uint8 x "
            "int8 products in saturating int16. Fix: quantize for this CPU (recipe "
            f"`target: {here.name}` or `target: auto`; Python `target=\"{here.name}\"`), which "
            "keeps those weights within +-64 (7 bits); for onnxruntime's own quantizer, "
            "reduce_range=True"
        )
    return text


def describe_ranges(ranges: Sequence[WeightRange], limit: int = 3) -> str:
    """``"Conv of 'conv1.weight' (|q| <= 127), Gemm of 'fc.weight' (...), +2 more"``."""
    shown = [
        f"{r.op_type} of {r.weight.removesuffix('_quantized')!r} (|q| <= {r.max_level})"
        for r in ranges[:limit]
    ]
    more = len(ranges) - limit
    return ", ".join(shown) + (f", +{more} more" if more > 0 else "")


def file_target(path: str | os.PathLike) -> str | None:
    """The target an int8 file was exported for (``slimline.int8_target`` metadata), if any."""
    model = onnx.load(str(Path(path)), load_external_data=False)
    return next(
        (p.value for p in model.metadata_props if p.key == "slimline.int8_target"), None
    )
