"""Static summary of an ONNX file: size, parameters, sparsity, op mix and I/O signature.

Deliberately torch-free (onnx + numpy only) so that inspecting an exported model works in a
deployment environment that has only onnxruntime installed.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

__all__ = [
    "GraphSummary",
    "DYNAMIC_QUANT_OPS",
    "OnnxFileError",
    "QOPERATOR_OPS",
    "TensorInfo",
    "atomic_write_bytes",
    "graph_summary",
    "load_model",
    "quant_format",
]

# Initializer types whose literal zeros we count as pruned weights. Integer (quantized) weights
# are counted separately: their "zero" is the zero-point of the DequantizeLinear that reads them.
_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)


_INT8_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8})
# Ops of ONNX Runtime's "QOperator" int8 format (quantized kernels baked into the file), as
# opposed to QDQ (float ops wrapped in QuantizeLinear/DequantizeLinear that the runtime fuses).
QOPERATOR_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearConcat",
        "QLinearSoftmax",
        "QGemm",
        "QAttention",
    }
)
# Dynamic quantization: activations are quantized at run time, weights stored as int8.
DYNAMIC_QUANT_OPS = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul"}
)


class OnnxFileError(ValueError):
    """The file exists but is not a loadable ONNX model (a text file, a ``.pt`` checkpoint, ...)."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output.

    ``shape`` holds an int for a fixed dimension, the dimension's name (e.g. ``"batch"``) for a
    named dynamic dimension, and ``None`` for an unnamed dynamic one.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str


@dataclass(frozen=True)
class GraphSummary:
    """What is inside an ONNX file; see :func:`graph_summary` for how each number is counted."""

    path: str
    file_bytes: int
    opset: int
    ir_version: int
    producer: str
    parameter_count: int
    parameter_bytes: int
    nonzero_parameters: int
    weight_count: int
    weight_zeros: int
    sparsity: float
    op_counts: dict[str, int]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    # The int8 picture (all zero / "float" for a float model):
    initializer_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    int8_initializers: int = 0  # INT8/UINT8 initializer tensors (weights, zero points)
    int8_bytes: int = 0
    quantize_nodes: int = 0  # QuantizeLinear
    dequantize_nodes: int = 0  # DequantizeLinear
    quant_format: str = "float"  # "float" | "qdq" | "qoperator" | "dynamic"

    @property
    def num_nodes(self) -> int:
        return sum(self.op_counts.values())

    @property
    def is_quantized(self) -> bool:
        return self.quant_format != "float"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        data["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.inputs]
        data["outputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.outputs]
        return data


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model, raising :class:`OnnxFileError` when the file is not one.

    The bytes are always parsed as binary protobuf: ``onnx.load`` guesses the format from the
    file extension, which turns a mislabelled ``.json``/``.txt`` into a confusing parser error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError, but older versions differ
        raise OnnxFileError(f"{path} is not an ONNX model (protobuf parsing failed)") from exc
    # Protobuf happily parses an empty (or lucky) byte string into an empty message, so check
    # that the fields every real model has are present.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise OnnxFileError(f"{path} is not an ONNX model (no graph / IR version / opset found)")
    if any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except OSError as exc:
            raise OnnxFileError(f"{path}: external weight data could not be read: {exc}") from exc
    return model


def graph_summary(path: str | os.PathLike) -> GraphSummary:
    """Summarise the ONNX model at ``path``.

    Counting rules:

    * ``parameter_count`` / ``parameter_bytes`` / ``nonzero_parameters``: every initializer of the
      main graph, including small shape constants the exporter folds in (e.g. ReduceMean axes).
    * ``weight_count`` / ``weight_zeros`` / ``sparsity``: floating-point initializers of
      rank >= 2, i.e. conv/linear/embedding weight tensors, plus int8/uint8 initializers of
      rank >= 2 read by a DequantizeLinear (QDQ weights), whose zeros are the elements equal to
      their zero point (per tensor or per channel), so a pruned-then-quantized model keeps its
      sparsity. Biases, norm statistics and shape constants are excluded because pruning never
      zeroes them and including them would dilute the number. ``sparsity`` is
      ``weight_zeros / weight_count`` (0.0 for a model without such weights).
    * ``op_counts``: nodes per op type, including nodes inside control-flow subgraphs (If/Loop);
      ops outside the default ONNX domain are keyed ``"domain.OpType"``.
    * ``opset``: the version of the default ONNX domain.
    * int8: ``initializer_bytes_by_dtype`` (e.g. ``{"float32": ..., "int8": ...}``),
      ``int8_initializers`` / ``int8_bytes`` (INT8 + UINT8 tensors, zero points included),
      ``quantize_nodes`` / ``dequantize_nodes``, and ``quant_format``: ``"qoperator"`` when the
      graph has QLinearConv-style ops (:data:`QOPERATOR_OPS`), else ``"qdq"`` when it has Q/DQ
      nodes, ``"dynamic"`` for run-time activation quantization (:data:`DYNAMIC_QUANT_OPS`),
      else ``"float"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OnnxFileError: the file is not a valid ONNX model.
    """
    path = Path(path)
    model = load_model(path)
    graph = model.graph

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    int8_zero_points = _dequantized_zero_points(graph, arrays)
    parameter_count = parameter_bytes = nonzero = weight_count = weight_zeros = 0
    int8_initializers = int8_bytes = 0
    bytes_by_dtype: Counter[str] = Counter()
    for init in graph.initializer:
        array = arrays[init.name]
        parameter_count += array.size
        parameter_bytes += array.nbytes
        bytes_by_dtype[str(array.dtype)] += array.nbytes
        nonzeros = int(np.count_nonzero(array))
        nonzero += nonzeros
        if init.data_type in _FLOAT_TYPES and array.ndim >= 2:
            weight_count += array.size
            weight_zeros += array.size - nonzeros
        elif init.data_type in _INT8_TYPES:
            int8_initializers += 1
            int8_bytes += array.nbytes
            if array.ndim >= 2 and init.name in int8_zero_points:
                weight_count += array.size
                weight_zeros += int(np.count_nonzero(array == int8_zero_points[init.name]))

    op_counts = _count_ops(graph)
    initializer_names = {init.name for init in graph.initializer}
    return GraphSummary(
        path=str(path),
        file_bytes=path.stat().st_size,
        opset=_default_opset(model),
        ir_version=model.ir_version,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        parameter_count=parameter_count,
        parameter_bytes=parameter_bytes,
        nonzero_parameters=nonzero,
        weight_count=weight_count,
        weight_zeros=weight_zeros,
        sparsity=weight_zeros / weight_count if weight_count else 0.0,
        op_counts=dict(sorted(op_counts.items())),
        # Old exporters list initializers as graph inputs too; they are not real inputs.
        inputs=tuple(_tensor_info(v) for v in graph.input if v.name not in initializer_names),
        outputs=tuple(_tensor_info(v) for v in graph.output),
        metadata={p.key: p.value for p in model.metadata_props},
        initializer_bytes_by_dtype=dict(sorted(bytes_by_dtype.items())),
        int8_initializers=int8_initializers,
        int8_bytes=int8_bytes,
        quantize_nodes=op_counts.get("QuantizeLinear", 0),
        dequantize_nodes=op_counts.get("DequantizeLinear", 0),
        quant_format=quant_format(op_counts),
    )


def quant_format(op_counts: Mapping[str, int]) -> str:
    """``"qdq"``, ``"qoperator"``, ``"dynamic"`` or ``"float"`` from op counts (see
    :func:`graph_summary`; ``"com.microsoft.QGemm"``-style keys count by their op type)."""
    types = {key.rsplit(".", 1)[-1] for key, count in op_counts.items() if count}
    # QOperator files also quantize the graph input and dequantize its output with Q/DQ nodes,
    # so their QLinear* ops decide; a QDQ file has no QLinear* ops until ORT fuses it.
    if types & QOPERATOR_OPS:
        return "qoperator"
    if types & {"QuantizeLinear", "DequantizeLinear"}:
        return "qdq"
    if types & DYNAMIC_QUANT_OPS:
        return "dynamic"
    return "float"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The temp file lives in the target folder because ``os.replace`` is only atomic within one
    filesystem. (Kept here rather than reusing ``slimline.io``: importing ``slimline`` pulls in
    torch, and this package must stay importable without it.)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # so a crash right after replace cannot leave it empty
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def _dequantized_zero_points(
    graph: onnx.GraphProto, arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Int8 initializer name -> its zero point, broadcastable to it, for every int8 weight a
    DequantizeLinear (or an onnxruntime ``MatMulIntegerToFloat``, as its B) reads (an absent
    zero point is 0; per-channel ones follow ``axis``)."""
    zero_points = {}
    for node in graph.node:
        # (weight input, zero point input, the axis a per-channel zero point runs along)
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            w_in, z_in = 0, 2
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        elif node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft":
            w_in, z_in, axis = 1, 5, -1  # export/ort_contrib.py: B with per-column zero points
        else:
            continue
        weight = arrays.get(node.input[w_in]) if len(node.input) > w_in else None
        if weight is None or weight.dtype not in (np.int8, np.uint8):
            continue
        zero = arrays.get(node.input[z_in]) if len(node.input) > z_in and node.input[z_in] else None
        if zero is None:
            zero = np.zeros((), weight.dtype)
        elif zero.ndim == 1 and zero.size > 1 and weight.ndim > 1:
            axis %= weight.ndim
            shape = [1] * weight.ndim
            shape[axis] = zero.size
            zero = zero.reshape(shape)
        zero_points[node.input[w_in]] = zero
    return zero_points


def _count_ops(graph: onnx.GraphProto) -> Counter[str]:
    counts: Counter[str] = Counter()
    for node in graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                counts += _count_ops(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    counts += _count_ops(sub)
    return counts


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value.type.tensor_type
    dtype = "unknown"
    if tensor_type.elem_type:
        try:
            dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):  # e.g. float8 types numpy has no name for
            dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    shape: list[int | str | None] = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return TensorInfo(name=value.name, shape=tuple(shape), dtype=dtype)
