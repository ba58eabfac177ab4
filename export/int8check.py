"""Will int8 actually be faster here? Checks for the usual reasons it is not (torch-free).

1. The CPU has no int8 dot-product instructions (x86: AVX512-VNNI / AVX-VNNI / AMX; Arm: the
   dot-product extension ``asimddp`` or ``i8mm``): int8 kernels then widen to int16/int32 and
   are rarely faster than fp32. On x86 they also saturate full-range weights: a file with int8
   weights beyond +-64 is then computed wrongly (:func:`saturation_warning`; see
   :mod:`slimline.export.target`).
2. The file is in QOperator format (``QLinearConv`` ... baked in at quantization time) rather
   than QDQ: the kernels are fixed, and other execution providers cannot re-fuse them.
3. QDQ nodes that onnxruntime did not fuse: after its graph optimizations a Conv/MatMul/Gemm
   still reads ``DequantizeLinear`` outputs, so it runs in float with extra (de)quantization
   around it. We look at what onnxruntime runs by saving its optimized graph
   (``SessionOptions.optimized_model_filepath``).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from .graph import DYNAMIC_QUANT_OPS, QOPERATOR_OPS, GraphSummary, graph_summary, load_model
from .int8numerics import describe_ranges, file_target, int8_weight_ranges, saturating_weights
from .target import target_for_machine

__all__ = [
    "Int8Warning",
    "describe_format",
    "UnfusedQdq",
    "int8_warnings",
    "isa_warning",
    "saturation_warning",
    "unfused_qdq",
]

# Float compute ops that a QDQ model expects onnxruntime to turn into int8 kernels.
_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention"})
_X86_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_ARM_INT8_FLAGS = ("asimddp", "i8mm")


class Int8Warning(UserWarning):
    """This int8 model is unlikely to be faster than its fp32 original on this setup."""


@dataclass(frozen=True)
class UnfusedQdq:
    """What onnxruntime runs for a QDQ model: compute nodes left in float, and the rest."""

    float_compute_nodes: tuple[str, ...]  # "OpType node_name", reading DequantizeLinear output
    int8_compute_nodes: int  # fused: QLinearConv, QGemm, MatMulInteger, ...
    quantize_nodes: int  # QuantizeLinear left in the optimized graph
    dequantize_nodes: int
    # MatMulIntegerToFloat without its bias, followed by the bias as a float Add
    separate_bias_adds: int = 0

    @property
    def fused_fraction(self) -> float:
        total = len(self.float_compute_nodes) + self.int8_compute_nodes
        return self.int8_compute_nodes / total if total else 1.0


def isa_warning(machine: Mapping[str, Any]) -> str | None:
    """A warning when ``machine`` (see :func:`slimline.export.latency.machine_info`) lacks int8
    dot-product instructions; ``None`` when it has them or the architecture is unknown."""
    flags = set(machine.get("isa_flags") or ())
    arch = str(machine.get("arch", "")).lower()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        wanted = _X86_INT8_FLAGS
    elif arch in ("aarch64", "arm64", "armv8l"):
        wanted = _ARM_INT8_FLAGS
    else:
        return None
    if flags & set(wanted):
        return None
    return (
        f"this CPU ({machine.get('cpu', 'unknown')}) has no int8 dot-product instructions "
        f"({' / '.join(wanted)} not in its flags), so int8 kernels are emulated with wider "
        "integer math and are rarely faster than fp32"
        + (
            "; its u8s8 kernels also saturate full-range int8 weights (pairs of products "
            "overflow int16), so quantize for it: recipe `target: auto` (or "
            f"`{target_for_machine(machine).name}`), or onnxruntime reduce_range=True"
            if arch in ("x86_64", "amd64", "i686", "x86")
            else ""
        )
    )


def saturation_warning(path: str | os.PathLike, machine: Mapping[str, Any]) -> str | None:
    """A warning when this machine's u8s8 kernels would compute the int8 file at ``path``
    wrongly (full-range weights on a CPU without VNNI), naming the layers, the target the file
    was made for (its metadata) and the fix; ``None`` when it is computed exactly."""
    here = target_for_machine(machine)
    over = saturating_weights(int8_weight_ranges(path), here)
    if not over:
        return None
    made_for = file_target(path)
    origin = f" (it was exported for {made_for})" if made_for else ""
    return (
        f"{Path(path).name}{origin} stores int8 weights beyond +-64 in {len(over)} layers "
        f"({describe_ranges(over)}), which this CPU's u8s8 kernels ({here.description}) add "
        "in saturating int16: its results here are WRONG, not just slow. Re-export it for "
        f"this CPU (recipe `target: {here.name}` or `auto`; onnxruntime reduce_range=True), "
        "or measure it on the machine it was made for"
    )


def unfused_qdq(
    path: str | os.PathLike,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> UnfusedQdq:
    """Optimize the model the way a session would and report which compute ops stayed float.

    Raises:
        OnnxFileError: onnxruntime cannot load or optimize the file.
    """
    from .latency import load_error  # local: latency imports this module

    options = ort.SessionOptions()
    options.graph_optimization_level = graph_optimization_level
    options.log_severity_level = 3  # the "hardware specific optimizations" notice is expected
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="slimline-int8check-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized_path)
        try:
            ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:
            raise load_error(Path(path), exc, providers) from exc
        if not optimized_path.is_file():  # some execution providers compile instead
            return UnfusedQdq((), 0, 0, 0)
        graph = load_model(optimized_path).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    floats, int8_ops, counts = [], 0, Counter(node.op_type for node in graph.node)
    for node in graph.node:
        if node.op_type in _COMPUTE_OPS:
            sources = [produced_by.get(name) for name in node.input if name]
            if any(s is not None and s.op_type == "DequantizeLinear" for s in sources):
                floats.append(f"{node.op_type} {node.name or '(unnamed)'}")
        elif node.op_type.startswith("QLinear") or node.op_type in (
            "QGemm",
            "QAttention",
            "MatMulInteger",
            "ConvInteger",
            "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat",
        ):
            int8_ops += 1
    return UnfusedQdq(
        float_compute_nodes=tuple(floats),
        int8_compute_nodes=int8_ops,
        quantize_nodes=counts["QuantizeLinear"],
        dequantize_nodes=counts["DequantizeLinear"],
        separate_bias_adds=_separate_bias_adds(graph),
    )


def _separate_bias_adds(graph: onnx.GraphProto) -> int:
    """Integer MatMuls whose only reader is an Add of a constant vector (a Linear's bias that
    onnxruntime left outside the kernel: static QDQ files; ``int8_ops: onnxruntime`` fuses it)."""
    shapes = {t.name: (tuple(t.dims), t.data_type) for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    count = 0
    for node in graph.node:
        if node.op_type != "MatMulIntegerToFloat" or (len(node.input) > 6 and node.input[6]):
            continue
        weight = shapes.get(node.input[1], ((), 0))[0]
        users = readers.get(node.output[0], [])
        if len(weight) != 2 or len(users) != 1 or users[0].op_type != "Add" or (
                node.output[0] in outputs):
            continue
        # what export/ort_contrib.py fuses: a float vector with one value per output column
        bias = ((weight[1],), onnx.TensorProto.FLOAT)
        if any(shapes.get(name) == bias for name in users[0].input if name != node.output[0]):
            count += 1
    return count


def describe_format(summary: GraphSummary) -> str:
    """E.g. ``"a float model"`` or ``"a QOperator-format int8 model (QLinearConv x9, ...)"``."""

    def ops(names: frozenset[str]) -> str:
        found = [f"{k} x{v}" for k, v in summary.op_counts.items() if k.rsplit(".", 1)[-1] in names]
        return ", ".join(found)

    if summary.quant_format == "qoperator":
        return f"a QOperator-format int8 model ({ops(QOPERATOR_OPS)})"
    if summary.quant_format == "dynamic":
        return f"a dynamically quantized model ({ops(DYNAMIC_QUANT_OPS)})"
    if summary.quant_format == "qdq":
        return (
            f"an int8 QDQ model ({summary.quantize_nodes} QuantizeLinear, "
            f"{summary.dequantize_nodes} DequantizeLinear)"
        )
    extra = f", {summary.int8_initializers} int8 tensors" if summary.int8_initializers else ""
    return f"a float model (no quantized ops{extra})"


def int8_warnings(
    path: str | os.PathLike,
    *,
    machine: Mapping[str, Any],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    summary: GraphSummary | None = None,
) -> list[str]:
    """Reasons the quantized model at ``path`` may not beat fp32 here (empty for a float model
    or when none applies). Each message starts with the file name."""
    summary = summary or graph_summary(path)
    if not summary.is_quantized:
        return []
    name = Path(path).name
    found = []
    saturation = saturation_warning(path, machine)
    if (isa := isa_warning(machine)) is not None:
        exact = " (this file's weights are within that range)" if saturation is None else ""
        found.append(f"{name}: {isa}{exact}")
    if saturation is not None:
        found.append(saturation)
    if summary.quant_format == "qoperator":
        found.append(
            f"{name} is {describe_format(summary)} instead of QDQ: its int8 kernels "
            "were fixed at quantization time and other execution providers cannot fuse them; "
            "re-quantize to QDQ (onnxruntime: quant_format=QuantFormat.QDQ)"
        )
    elif summary.quant_format == "qdq":
        result = unfused_qdq(
            path, providers=providers, graph_optimization_level=graph_optimization_level
        )
        if result.float_compute_nodes:
            shown = ", ".join(result.float_compute_nodes[:3])
            more = len(result.float_compute_nodes) - 3
            found.append(
                f"{name}: {len(result.float_compute_nodes)} of "
                f"{len(result.float_compute_nodes) + result.int8_compute_nodes} quantized "
                f"compute nodes still run in float between DequantizeLinear and QuantizeLinear "
                f"after onnxruntime's optimizations ({shown}{f', +{more} more' if more > 0 else ''}"
                f"; {result.quantize_nodes} QuantizeLinear / {result.dequantize_nodes} "
                "DequantizeLinear left): onnxruntime has no fused int8 kernel for that pattern "
                "on this provider (on x86 CPUs int8 activations, S8S8, are a common cause: "
                "quantize activations as uint8)"
            )
        if result.separate_bias_adds:
            found.append(
                f"{name}: {result.separate_bias_adds} integer MatMuls add their bias in a "
                "separate float Add (onnxruntime does not fuse a static QDQ MatMul's bias); "
                "slimline's export.onnx with int8_ops: onnxruntime writes it inside the kernel "
                "(5-10 % faster on transformers; the file then runs on onnxruntime only), as "
                "does slimline.export.ort_contrib.fuse_matmul_bias_file on this file"
            )
    return found
