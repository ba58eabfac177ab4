"""Baseline int8 post-training quantization with ``onnxruntime.quantization``.

This is the reference our own int8 QDQ export is compared with: static QDQ (calibrated on real
inputs, per-channel weights) for conv nets, dynamic (weights int8, activations quantized at run
time) for Linear/attention models. Torch-free: onnx + onnxruntime + numpy only.

Defaults follow what ONNX Runtime's x86 CPU kernels fuse: uint8 activations with int8 weights
(U8S8). With int8 activations (S8S8) onnxruntime 1.31 leaves many Conv nodes unfused (they run
in float between DequantizeLinear/QuantizeLinear), which is slower than the fp32 model; the
profiler warns when it sees that (see :mod:`slimline.export.int8check`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from slimline.params import ParamError, param

from .feeds import pad_id_of, sample_feeds
from .graph import (
    GraphSummary,
    TensorInfo,
    atomic_write_bytes,
    graph_summary,
    load_model,
)
from .target import Target, resolve_target

__all__ = [
    "OrtQuantizeConfig",
    "QuantizationError",
    "ort_quantize",
]

_QUANT_TYPES = ("int8", "uint8")
_CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
# Dynamic quantization targets the matrix products of Linear/attention layers; ConvInteger
# exists but is slower than float Conv on most CPUs, so convs are left alone unless asked for.
_DYNAMIC_DEFAULT_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU")


class QuantizationError(ValueError):
    """The model cannot be quantized as asked; the message names the file and the reason."""


def ort_quantize(
    fp32_onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    calibration: np.ndarray | Mapping[str, np.ndarray] | None,
    mode: Literal["static", "dynamic"] = "static",
    per_channel: bool = True,
    activation_type: Literal["int8", "uint8"] = "uint8",
    weight_type: Literal["int8", "uint8"] = "int8",
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax",
    op_types: Sequence[str] | None = None,
    exclude_nodes: Sequence[str] = (),
    reduce_range: bool | None = None,
    calibration_batch_size: int = 32,
    preprocess: bool = True,
    target: Target | str | None = "auto",
) -> Path:
    """Quantize the fp32 ONNX model at ``fp32_onnx_path`` to int8 and write it to ``out_path``.

    ``mode="static"`` writes QDQ (QuantizeLinear/DequantizeLinear around each quantized op)
    with activation ranges calibrated on ``calibration``: an array of model inputs
    ``(N, *input_shape)`` for a single-input model, or ``{input name: array}``. ``mode="dynamic"``
    quantizes only weights of ``op_types`` (default MatMul/Gemm/attention/RNN) and needs no
    calibration. ``per_channel`` gives each output channel its own weight scale.
    ``reduce_range`` uses 7-bit weights, which CPUs without VNNI need to compute U8S8 exactly;
    ``None`` takes it from ``target``, the CPU the file is for (``"auto"``: this one; see
    :mod:`slimline.export.target`), which is also recorded in the file's metadata.
    ``preprocess`` runs ONNX shape inference and ORT's graph optimizations first, as
    onnxruntime recommends (its symbolic shape inference is skipped: it takes seconds and is
    only needed for shapes plain ONNX inference cannot resolve).

    The result is checked before it is written (it must contain quantized ops and run in
    onnxruntime) and written atomically: on any error nothing is left at ``out_path``.

    Raises:
        FileNotFoundError: no file at ``fp32_onnx_path``.
        OnnxFileError: the file is not an ONNX model.
        QuantizationError: bad arguments or calibration data, an already quantized model, or
            onnxruntime failed / quantized nothing (the message says which).
    """
    source = Path(fp32_onnx_path)
    out = Path(out_path)
    summary = graph_summary(source)  # FileNotFoundError / OnnxFileError for a bad file
    _check_arguments(source, summary, mode, activation_type, weight_type, calibrate_method)
    if calibration_batch_size < 1:
        raise QuantizationError(
            f"calibration_batch_size must be >= 1, got {calibration_batch_size}"
        )
    feeds = None
    if mode == "static":
        feeds = _calibration_feeds(source, summary, calibration)

    from onnxruntime import quantization as q  # imported here: it is slow to import

    resolved = resolve_target(target)
    if reduce_range is None:
        reduce_range = resolved.scheme.reduce_range

    qtype = {"int8": q.QuantType.QInt8, "uint8": q.QuantType.QUInt8}
    with tempfile.TemporaryDirectory(prefix="slimline-quant-") as tmp, _quiet_quantizer():
        model_in = _cleaned_copy(source, Path(tmp) / "input.onnx")
        if preprocess:
            model_in = Path(tmp) / "preprocessed.onnx"
            try:
                q.quant_pre_process(
                    str(Path(tmp) / "input.onnx"), str(model_in), skip_symbolic_shape=True
                )
            except Exception as exc:  # ORT raises plain Exceptions with its own text
                raise QuantizationError(
                    f"{source}: onnxruntime's quantization pre-processing failed: {first_error_line(exc)} "
                    "(try preprocess=False)"
                ) from exc
        quantized = Path(tmp) / "quantized.onnx"
        common: dict[str, Any] = {
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "weight_type": qtype[weight_type],
            "nodes_to_exclude": list(exclude_nodes) or None,
            "op_types_to_quantize": list(op_types) if op_types else None,
        }
        try:
            if mode == "static":
                assert feeds is not None
                q.quantize_static(
                    str(model_in),
                    str(quantized),
                    _ArrayReader(feeds, calibration_batch_size, _fixed_batch(summary.inputs)),
                    quant_format=q.QuantFormat.QDQ,
                    activation_type=qtype[activation_type],
                    calibrate_method=getattr(q.CalibrationMethod, _METHOD_NAMES[calibrate_method]),
                    **common,
                )
            else:
                common["op_types_to_quantize"] = common["op_types_to_quantize"] or list(
                    _DYNAMIC_DEFAULT_OPS
                )
                q.quantize_dynamic(str(model_in), str(quantized), **common)
        except QuantizationError:
            raise
        except Exception as exc:
            raise QuantizationError(
                f"{source}: onnxruntime {mode} quantization failed: {first_error_line(exc)}"
            ) from exc
        _check_result(source, quantized, mode, feeds)
        model = load_model(quantized)
        props = {prop.key: prop.value for prop in model.metadata_props}
        onnx.helper.set_model_props(model, {**props, "slimline.int8_target": resolved.name,
                                            "slimline.reduce_range": str(reduce_range)})
        data = model.SerializeToString()
    return atomic_write_bytes(out, data)


# --- the export.ort_quantize method ---------------------------------------------------------


@dataclass
class OrtQuantizeConfig:
    """onnxruntime.quantization's int8 PTQ (the baseline): static QDQ calibrated on training
    inputs, or dynamic."""

    mode: Literal["static", "dynamic"] = param(
        "static", help="static: QDQ with calibrated activations; dynamic: Linear/attention only"
    )
    per_channel: bool = param(True, help="one weight scale per output channel")
    activation_type: Literal["uint8", "int8"] = param(
        "uint8", help="uint8 (U8S8) is what onnxruntime's x86 kernels fuse; int8 may run unfused"
    )
    weight_type: Literal["int8", "uint8"] = param("int8", help="weight integer type")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = param(
        "minmax", help="how activation ranges are chosen from the calibration data"
    )
    calibration_samples: int = param(256, help="training inputs used to calibrate (static)")
    calibration_seed: int | None = param(None, help="which samples (default: the recipe seed)")
    reduce_range: bool | None = param(
        None,
        help="7-bit weights, which CPUs without VNNI need for exact u8s8 results; default: "
        "what the recipe's target needs",
    )
    split: Literal["test", "val"] = param("test", help="split the int8 model is scored on")
    batch_size: int = param(256, help="samples per onnxruntime call when scoring")
    filename: str = param("model.int8.onnx", help="name of the int8 file in the stage directory")

    def __post_init__(self) -> None:
        if self.calibration_samples < 1:
            raise ParamError("calibration_samples", "must be at least 1")
        if self.batch_size < 1:
            raise ParamError("batch_size", "must be at least 1")
        if "/" in self.filename or not self.filename.endswith(".onnx"):
            raise ParamError(
                "filename", f"expected a plain name ending in .onnx, got {self.filename!r}"
            )


# --- helpers ---------------------------------------------------------------------------------

_METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _check_arguments(
    source: Path,
    summary: GraphSummary,
    mode: str,
    activation_type: str,
    weight_type: str,
    calibrate_method: str,
) -> None:
    if mode not in ("static", "dynamic"):
        raise QuantizationError(f"mode must be 'static' or 'dynamic', got {mode!r}")
    for name, value in (("activation_type", activation_type), ("weight_type", weight_type)):
        if value not in _QUANT_TYPES:
            raise QuantizationError(f"{name} must be one of {_QUANT_TYPES}, got {value!r}")
    if calibrate_method not in _CALIBRATE_METHODS:
        raise QuantizationError(
            f"calibrate_method must be one of {_CALIBRATE_METHODS}, got {calibrate_method!r}"
        )
    if summary.is_quantized:
        raise QuantizationError(
            f"{source} is already quantized ({summary.quant_format} format: "
            f"{summary.quantize_nodes} QuantizeLinear, {summary.int8_initializers} int8 "
            "tensors); quantize the fp32 export instead"
        )


def _calibration_feeds(
    source: Path,
    summary: GraphSummary,
    calibration: np.ndarray | Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Validate calibration data against the model inputs: name, rank, fixed dims, dtype."""
    inputs = summary.inputs
    if calibration is None:
        raise QuantizationError(
            f"{source}: static quantization needs calibration inputs (a few hundred real "
            "samples); pass calibration=..., or use mode='dynamic'"
        )
    names = [info.name for info in inputs]
    if isinstance(calibration, Mapping):
        feeds = {name: np.asarray(value) for name, value in calibration.items()}
        if set(feeds) != set(names):
            raise QuantizationError(
                f"{source}: calibration names {sorted(feeds)} do not match the model inputs {names}"
            )
    else:
        try:  # one array: a single-input model, or token ids with derivable masks
            feeds = sample_feeds(inputs, np.asarray(calibration), pad_id_of(summary.metadata))
        except ValueError as exc:
            raise QuantizationError(f"{source}: {exc}") from None
    counts = set()
    for info in inputs:
        array = feeds[info.name]
        if array.ndim != len(info.shape):
            raise QuantizationError(
                f"{source}: calibration for input {info.name!r} has shape {array.shape} (rank "
                f"{array.ndim}); the model expects rank {len(info.shape)} {list(info.shape)}"
            )
        for axis, dim in enumerate(info.shape[1:], start=1):
            if isinstance(dim, int) and dim > 0 and array.shape[axis] != dim:
                raise QuantizationError(
                    f"{source}: calibration for input {info.name!r} has shape {array.shape}; "
                    f"dim {axis} must be {dim} (model input {list(info.shape)})"
                )
        if len(array) == 0:
            raise QuantizationError(f"{source}: calibration for {info.name!r} is empty")
        if info.dtype.startswith("float") and array.dtype != np.dtype(info.dtype):
            array = array.astype(info.dtype)
            feeds[info.name] = array
        counts.add(len(array))
    if len(counts) > 1:
        raise QuantizationError(f"{source}: calibration inputs have different sample counts")
    return feeds


def _cleaned_copy(source: Path, target: Path) -> Path:
    """``source`` without value_info for initializers: torch's dynamo exporter records them,
    and the quantizer's shape inference then fails on its own transposed Gemm weight
    ("Inferred shape and existing shape differ")."""
    model = load_model(source)
    initializers = {init.name for init in model.graph.initializer}
    kept = [info for info in model.graph.value_info if info.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    target.write_bytes(model.SerializeToString())
    return target


def _fixed_batch(inputs: Sequence[TensorInfo]) -> int | None:
    dims = {info.shape[0] for info in inputs if info.shape}
    fixed = [d for d in dims if isinstance(d, int) and d > 0]
    return fixed[0] if fixed else None


def _check_result(
    source: Path, quantized: Path, mode: str, feeds: dict[str, np.ndarray] | None
) -> None:
    """The graph check after export: quantized ops are there and onnxruntime runs it."""
    summary = graph_summary(quantized)
    expected = "qdq" if mode == "static" else "dynamic"
    if summary.quant_format != expected:
        ops = ", ".join(f"{k} x{v}" for k, v in summary.op_counts.items())
        raise QuantizationError(
            f"{source}: onnxruntime {mode} quantization quantized nothing (no "
            f"{'QuantizeLinear/DequantizeLinear' if mode == 'static' else 'MatMulInteger'} "
            f"nodes in the result; the model's ops: {ops}). Check op_types/exclude_nodes."
        )
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(quantized), sess_options=options, providers=["CPUExecutionProvider"]
        )
        if feeds is not None:
            session.run(None, {name: array[:1] for name, array in feeds.items()})
    except Exception as exc:
        raise QuantizationError(
            f"{source}: the quantized model does not run in onnxruntime: {first_error_line(exc)}"
        ) from exc


class _ArrayReader:
    """``CalibrationDataReader`` over in-memory arrays, ``batch_size`` samples at a time
    (the model's own batch size when that is fixed)."""

    def __init__(self, feeds: dict[str, np.ndarray], batch_size: int, fixed: int | None):
        self.feeds = feeds
        self.batch_size = fixed or batch_size
        self.count = len(next(iter(feeds.values())))
        self.rewind()

    def rewind(self) -> None:
        step = self.batch_size
        starts = range(0, self.count - step + 1 if self.count >= step else 1, step)
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{name: array[s : s + step] for name, array in self.feeds.items()} for s in starts]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # CalibrationDataReader's protocol
        return self._batches

    def __len__(self) -> int:  # some ORT calibrators size their progress by it
        return max(1, self.count // self.batch_size)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs INFO/WARNING chatter ("Please consider pre-processing ...") through
    the root logger and prints calibration progress; failures surface as QuantizationError."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def first_error_line(exc: BaseException) -> str:
    """The first non-empty line of an exception (onnxruntime puts its whole log in one)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
