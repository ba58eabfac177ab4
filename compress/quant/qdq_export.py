"""Export a quantized PyTorch model to an int8 QDQ ONNX file with exactly its scales.

How: a deep copy of the model is traced by :func:`export.export_onnx` (the dynamo exporter)
with its activation hooks in QDQ mode (quantize/dequantize ops, see
:func:`slimline.compress.quant.state.tracing_as_qdq`) and each quantized weight behind a parametrization
that quantizes/dequantizes it, so the traced graph carries every scale and zero point as
PyTorch has them (float32 -> float64 -> float32 is exact). :func:`slimline.export.qdq.write_qdq` then
stores the weights as int8 initializers, int32 biases, and folds weight transposes, giving
the layout ONNX Runtime fuses into QLinearConv / QGemm / MatMulIntegerToFloat / QLinearAdd.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.nn as nn
from torch.nn.utils import parametrize

from slimline.compress.quant.spec import QuantSpec
from slimline.compress.quant.state import (
    QuantState,
    attach_quantization,
    off_grid_parameters,
    quantization_of,
    tracing_as_qdq,
)
from slimline.compress.quant.target import Target, resolve_target

if TYPE_CHECKING:
    from slimline.export.qdq_inspect import QDQSummary

__all__ = ["QDQExportError", "export_qdq_onnx", "scale_mismatches"]


class QDQExportError(RuntimeError):
    """The model cannot be exported as int8 QDQ (no quantization state, weights off the grid,
    or an exporter failure); nothing was written."""


class _WeightQDQ(nn.Module):
    """Parametrization emitting quantize/dequantize ops for one weight (trace only)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        ops, spec = torch.ops.quantized_decomposed, self.spec
        dtype = torch.int8 if spec.signed else torch.uint8
        if spec.per_channel:
            zero_point = spec.zero_point.to(torch.int64)
            q = ops.quantize_per_channel(
                weight, spec.scale, zero_point, spec.axis, spec.qmin, spec.qmax, dtype
            )
            return ops.dequantize_per_channel(
                q, spec.scale, zero_point, spec.axis, spec.qmin, spec.qmax, dtype
            )
        scale, zero_point = float(spec.scale), int(spec.zero_point)
        q = ops.quantize_per_tensor(weight, scale, zero_point, spec.qmin, spec.qmax, dtype)
        return ops.dequantize_per_tensor(q, scale, zero_point, spec.qmin, spec.qmax, dtype)


def export_qdq_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    state: QuantState | None = None,
    target: Target | str | None = None,
    int8_ops: str = "qdq",
) -> tuple[Path, dict[str, Any]]:
    """Export ``model`` (with quantization attached, or ``state``) as an int8 QDQ ONNX file.

    ``target`` is the CPU the file is for (default: the one the state was quantized for, else
    this machine; see :mod:`slimline.export.target`). The stored weight levels must be ones that
    target's onnxruntime kernels compute exactly, else nothing is written; the file records the
    target and its scheme in its metadata (``slimline.int8_target``, ``slimline.int8_scheme``).

    Weights with at most 8 bits are stored as int8/uint8 initializers (a 4-bit weight keeps its
    16-level grid inside int8), biases of quantized layers as int32. ``int8_ops="onnxruntime"``
    writes each MatMul + bias as onnxruntime's MatMulIntegerToFloat
    (:mod:`slimline.export.ort_contrib`). Returns the path and the rewrite report of
    :func:`slimline.export.qdq.finalize_qdq` (with ``contrib_matmuls``).

    Raises:
        QDQExportError: no quantization state, parameters off their grid, weights the target
            would saturate, or the export failed.
    """
    from slimline.export import ExportError, export_onnx
    from slimline.export.int8numerics import describe_ranges, int8_weight_ranges, saturating_weights
    from slimline.export.onnx_export import onnx_inputs_of
    from slimline.export.qdq import QDQError, write_qdq
    from slimline.export.qdq_inspect import qdq_summary

    state = state or quantization_of(model)
    if state is None:
        raise QDQExportError(
            f"{type(model).__name__} has no quantization state: quantize it "
            "first (e.g. slimline.compress.quant.quantize_rtn or the quant.rtn stage)"
        )
    off_grid = off_grid_parameters(model, state)
    if off_grid:
        raise QDQExportError(
            f"parameters off their quantization grid (changed after "
            f"quantization?): {', '.join(off_grid[:5])}; re-run the quantizer"
        )
    not_8bit = [key for key, spec in state.activations.items() if spec.bits != 8]
    if not_8bit:
        raise QDQExportError(f"activations must be 8-bit for int8 kernels: {not_8bit[:5]}")
    wide = [
        name for name, spec in state.weights.items() if spec.bits > 8 and not name.endswith(".bias")
    ]
    if wide:
        raise QDQExportError(f"weights wider than 8 bits cannot be stored as int8: {wide[:5]}")

    resolved = resolve_target(target if target is not None else state.info.get("target"))
    traced = attach_quantization(copy.deepcopy(model).eval(), state)  # hooks even if only given
    modules = dict(traced.named_modules())
    for name, spec in state.weights.items():
        owner, _, attribute = name.rpartition(".")
        if spec.bits <= 8:  # int32 biases are quantized from the graph's scales (slimline.export.qdq)
            parametrize.register_parametrization(
                modules[owner], attribute, _WeightQDQ(spec), unsafe=True
            )
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, raw = tempfile.mkstemp(
        prefix=f".{destination.name}.traced.", suffix=".onnx", dir=destination.parent
    )
    os.close(handle)
    try:
        try:
            with tracing_as_qdq(), torch.no_grad():
                tensors, names = onnx_inputs_of(traced, example_input)
                export_onnx(traced, tensors, raw, opset=opset, dynamic_batch=dynamic_batch,
                            input_names=names)
        except ExportError as exc:
            raise QDQExportError(
                f"int8 QDQ export of {type(model).__name__} failed (it needs "
                f"the dynamo exporter): {exc}"
            ) from exc
        metadata = {
            "slimline.int8_target": resolved.name,
            "slimline.int8_scheme": json.dumps(resolved.scheme.to_dict(), sort_keys=True),
        }
        try:
            report = write_qdq(raw, destination, metadata=metadata,
                               fuse_bias=int8_ops == "onnxruntime")
        except QDQError as exc:
            raise QDQExportError(f"int8 QDQ rewrite failed: {exc}") from exc
        mismatches = scale_mismatches(qdq_summary(destination), state)
        if mismatches:
            destination.unlink(missing_ok=True)
            raise QDQExportError(
                "exported scales differ from the PyTorch model's: " + "; ".join(mismatches[:5])
            )
        over = saturating_weights(int8_weight_ranges(destination), resolved)
        if over:
            destination.unlink(missing_ok=True)
            quantized_for = state.info.get("target", "an unrecorded target")
            raise QDQExportError(
                f"{len(over)} layers store int8 weights that target {resolved.name}'s "
                f"onnxruntime kernels would compute wrongly ({describe_ranges(over)}; "
                f"{resolved.scheme.reason}). The model was quantized for {quantized_for}: "
                f"quantize it again with target {resolved.name!r}. No file was written"
            )
        report["target"] = resolved.name
    finally:
        Path(raw).unlink(missing_ok=True)
    return destination, report


def scale_mismatches(summary: QDQSummary, state: QuantState) -> list[str]:
    """Every way the QDQ graph's scales/zero points differ from ``state`` (empty: identical,
    bit for bit). Weights are matched by name (``<parameter>_quantized``); activations by
    value, since graph tensors carry no module names: each activation spec must appear as a
    QuantizeLinear, and each QuantizeLinear must be one of the specs."""
    problems = []
    for name, spec in state.weights.items():
        if spec.bits > 8:
            continue
        found = summary.weights.get(f"{name}_quantized")
        if found is None:
            problems.append(f"{name}: no int8 initializer {name}_quantized")
            continue
        scale = np.asarray(found["scale"], np.float32).reshape(-1)
        zero_point = np.asarray(found["zero_point"]).reshape(-1)
        if not (
            np.array_equal(scale, spec.scale.numpy().reshape(-1))
            and np.array_equal(zero_point, spec.zero_point.numpy().reshape(-1))
        ):
            problems.append(f"{name}: scale/zero point differ")
        if found["min"] < spec.qmin or found["max"] > spec.qmax:
            problems.append(
                f"{name}: levels [{found['min']}, {found['max']}] outside "
                f"[{spec.qmin}, {spec.qmax}]"
            )
    expected = {
        (float(np.float32(s.scale.item())), int(s.zero_point.item()))
        for s in state.activations.values()
    }
    present = {(float(np.float32(a["scale"])), int(a["zero_point"])) for a in summary.activations}
    problems += [
        f"activation scale {s!r} zero point {z} has no QuantizeLinear"
        for s, z in sorted(expected - present)
    ]
    problems += [
        f"QuantizeLinear scale {s!r} zero point {z} is no activation spec"
        for s, z in sorted(present - expected)
    ]
    return problems
