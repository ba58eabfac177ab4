"""Export a (compressed) model for deployment, checked: what ``export.onnx`` and
:func:`slimline.export_model` do (fp32 or int8 QDQ ONNX with a dynamic batch, verified
against PyTorch on the given inputs).

``format: fp32`` exports the model as it computes in PyTorch and enforces tight parity (a
quantized model's fake quantization then becomes float Div/Round/Clip/Mul ops: a simulation).
``format: int8`` needs a quantized model (``state["quantization"]``, e.g. from ``quant.rtn``)
and writes QuantizeLinear/DequantizeLinear with exactly the PyTorch scales, int8 weights and
int32 biases, laid out so onnxruntime fuses them into integer kernels. Integer kernels round
differently from PyTorch's float fake-quant (requantization), so int8 parity is judged by top-1
agreement and the largest logit difference relative to the largest logit.

The int8 grids follow ``target`` (the CPU the file is for). When this machine's
onnxruntime kernels cannot compute the file exactly (e.g. full-range weights made for a VNNI
server, exported on an AVX2 laptop), parity is checked on onnxruntime's unfused QDQ reference
path instead, and the metrics say so; a parity failure names the first diverging node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from slimline.compress.methods import MethodError
from slimline.export.target import Target, resolve_target
from slimline.params import ParamError, check_range, param

__all__ = ["ExportConfig", "ExportResult", "export_model", "not_exact_here_note"]


@dataclass
class ExportConfig:
    """fp32 or int8 QDQ ONNX with a dynamic batch, checked against PyTorch."""

    format: Literal["fp32", "int8"] = param(
        "fp32", help="fp32, or int8 QDQ (needs a quantized model, e.g. from quant.rtn)"
    )
    opset: int = param(18, help="ONNX opset (>= 17)")
    dynamic_batch: bool = param(True, help="export the batch dimension as dynamic")
    atol: float = param(1e-4, help="fp32 parity: allowed max |onnxruntime - torch| (plus rtol)")
    rtol: float = param(1e-3, help="fp32 parity: tolerance relative to the largest |logit|")
    int8_min_agreement: float = param(
        0.98, help="int8 parity: least top-1 agreement of onnxruntime int8 vs PyTorch fake-quant"
    )
    int8_max_rel_diff: float = param(
        0.05, help="int8 parity: largest max|int8 - fake-quant logit| / max|fake-quant logit|"
    )
    int8_min_cosine: float = param(
        0.98, help="int8 parity of embedding models (output_kind 'embedding', e.g. an hf "
        "feature-extraction model): least cosine of any onnxruntime int8 row vs fake-quant"
    )
    int8_ops: Literal["qdq", "onnxruntime"] = param(
        "qdq", help="int8 only. qdq: standard QuantizeLinear/DequantizeLinear, read by every "
        "ONNX runtime (onnxruntime fuses them, but runs each MatMul's bias as its own Add); "
        "onnxruntime: each Linear's MatMul and bias as onnxruntime's com.microsoft."
        "MatMulIntegerToFloat (about 5% faster on transformers; the file runs on onnxruntime only)"
    )
    parity_samples: int = param(64, help="test-split samples used for the parity check (stage)")
    filename: str = param("model.onnx", help="name of the exported file in the stage directory")

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ParamError("opset", f"must be at least 17, got {self.opset}")
        if self.int8_ops != "qdq" and self.format != "int8":
            raise ParamError("int8_ops", f"{self.int8_ops!r} applies to format int8 only "
                             f"(this export is format {self.format})")
        if self.parity_samples < 1:
            raise ParamError("parity_samples", "must be at least 1")
        check_range("int8_min_agreement", self.int8_min_agreement, 0.0, 1.0)
        check_range("int8_min_cosine", self.int8_min_cosine, -1.0, 1.0)
        if self.int8_max_rel_diff <= 0:
            raise ParamError("int8_max_rel_diff", "must be positive")
        if "/" in self.filename or not self.filename.endswith(".onnx"):
            raise ParamError(
                "filename", f"expected a plain name ending in .onnx, got {self.filename!r}"
            )


@dataclass
class ExportResult:
    """The written file and what was measured about it (the ``export.onnx`` stage's metrics)."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def export_model(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    parity_inputs: torch.Tensor | None = None,
    target: Target | str | None = "auto",
) -> ExportResult:
    """Write ``model`` as ``config.format`` ONNX at ``path`` and check it against PyTorch on
    ``parity_inputs`` (default: ``example_input``); a failed check deletes the file and raises
    :class:`~slimline.compress.methods.MethodError` naming the numbers (for int8, the first
    diverging node too). ``target`` is the CPU an int8 file is for (see the module docstring).
    """
    from slimline.export import ExportError, check_parity, export_onnx, graph_summary
    from slimline.export.onnx_export import onnx_inputs_of

    config = config or ExportConfig()
    target = resolve_target(target)
    path = Path(path)
    samples = example_input if parity_inputs is None else parity_inputs
    int8: dict[str, Any] = {}
    try:
        if config.format == "int8":
            int8 = _export_int8(model, example_input, path, config, target)
        else:
            tensors, names = onnx_inputs_of(model, example_input)
            export_onnx(model, tensors, path, opset=config.opset,
                        dynamic_batch=config.dynamic_batch, input_names=names)
    except ExportError as exc:
        raise MethodError(str(exc)) from None
    exact_here = config.format != "int8" or exact_on_this_machine(path)
    parity = check_parity(model, path, samples, atol=config.atol, rtol=config.rtol,
                          optimize=exact_here)
    embedding = getattr(model, "output_kind", "logits") == "embedding"
    if config.format == "int8" and embedding:
        # int8 error spreads over every dimension of an embedding; its direction is what
        # retrieval and similarity use (an argmax or one coordinate's error mean nothing).
        passed = parity.cosine_min >= config.int8_min_cosine
        bounds = f"an embedding model needs cosine >= {config.int8_min_cosine} on every row"
    elif config.format == "int8":
        passed = (parity.top1_agreement >= config.int8_min_agreement
                  and parity.max_rel_diff <= config.int8_max_rel_diff)
        bounds = (f"needs top-1 agreement >= {config.int8_min_agreement} and max |diff| / "
                  f"max|logit| <= {config.int8_max_rel_diff}")
    else:
        passed = parity.passed
        bounds = f"atol {config.atol} + rtol {config.rtol} x max|logit|"
    if not passed:
        why = (_int8_diagnosis(path, model, samples, exact_here) if config.format == "int8"
               else "")
        path.unlink(missing_ok=True)
        raise MethodError(
            f"onnxruntime {config.format} output differs from PyTorch: max |diff| = "
            f"{parity.max_abs_diff:.3g} (relative {parity.max_rel_diff:.3g}), top-1 "
            f"agreement {parity.top1_agreement:.3f}, least cosine {parity.cosine_min:.4f}; "
            f"{bounds}; {why}no file was kept"
        )
    summary = graph_summary(path)
    metrics: dict[str, Any] = {
        "format": config.format,
        "onnx_bytes": summary.file_bytes,
        "onnx_parameters": summary.parameter_count,
        "onnx_sparsity": summary.sparsity,
        "op_counts": summary.op_counts,
        "opset": config.opset,
        "max_abs_diff": parity.max_abs_diff,
        "max_rel_diff": parity.max_rel_diff,
        "top1_agreement": parity.top1_agreement,
        "cosine_min": parity.cosine_min,
        "parity_samples": int(samples.shape[0]),
        **({"outputs": "embedding"} if embedding else {}),  # parity judged by cosine
        **int8,
    }
    if config.format == "int8":  # the file's own Q/DQ nodes (qdq_summary reads its QDQ form)
        metrics["quantize_nodes"] = summary.quantize_nodes
        metrics["dequantize_nodes"] = summary.dequantize_nodes
        metrics["parity_backend"] = (
            "onnxruntime" if exact_here else "onnxruntime reference (unfused QDQ)"
        )
        if not exact_here:
            metrics["note"] = not_exact_here_note(target.name)
    return ExportResult(path, metrics)


def exact_on_this_machine(path: Path) -> bool:
    """Whether this CPU's onnxruntime int8 kernels compute the file's weights exactly."""
    from slimline.export.int8numerics import exact_on

    return exact_on(path)


def not_exact_here_note(target: str) -> str:
    """What a stage says when it checked a file made for another CPU on the reference path."""
    from slimline.export.machine import machine_info
    from slimline.export.target import target_for_machine

    here = target_for_machine(machine_info()).name
    return (
        f"made for {target}; this CPU ({here}) would saturate its full-range int8 weights, so "
        "the file was checked on onnxruntime's unfused QDQ reference path, not on integer "
        f"kernels: run `slimline profile FILE --verify-int8` on a {target} machine to check them"
    )


def _int8_diagnosis(path: Path, model: nn.Module, samples: torch.Tensor, exact_here: bool) -> str:
    """The first diverging node (and the saturation signature), as the start of a sentence."""
    if not exact_here:
        return (
            "onnxruntime's reference path (no fused kernels) already differs, so the QDQ graph "
            "itself does not compute what PyTorch's fake-quant model does; "
        )
    from slimline.export.graph import graph_summary
    from slimline.export.int8numerics import explain_int8_mismatch
    from slimline.export.machine import machine_info
    from slimline.export.onnx_export import onnx_feeds

    feed = onnx_feeds(model, samples, [info.name for info in graph_summary(path).inputs])
    try:
        text = explain_int8_mismatch(path, feed, machine=machine_info())
    except Exception as exc:  # a diagnosis must never hide the parity failure itself
        return f"(no node-level diagnosis: {type(exc).__name__}: {exc}); "
    return f"{text}; "


def _export_int8(model: nn.Module, example_input: torch.Tensor, path: Path, p: ExportConfig,
                 target: Target) -> dict[str, Any]:
    """Write the int8 QDQ file; the int8-specific metrics."""
    from slimline.compress.quant import QDQExportError, export_qdq_onnx
    from slimline.compress.quant.state import quantization_of
    from slimline.export.qdq_inspect import (
        FLOAT_KERNEL_OPS,
        INT8_KERNEL_OPS,
        ort_optimized_op_counts,
        qdq_summary,
    )

    state = quantization_of(model)
    if state is None:
        raise MethodError(
            "format 'int8' needs a quantized model, and this one has no quantization state: "
            "quantize it first (slimline.quantize, or a quant.* stage before this one in "
            "'needs'). No file was written."
        )
    try:
        _, report = export_qdq_onnx(model, example_input, path, opset=p.opset,
                                    dynamic_batch=p.dynamic_batch, target=target,
                                    int8_ops=p.int8_ops)
    except QDQExportError as exc:
        path.unlink(missing_ok=True)
        raise MethodError(str(exc)) from None
    qdq = qdq_summary(path)
    runtime_ops = ort_optimized_op_counts(path)
    bits = state.info.get("weight_bits")
    metrics = {
        # Literal zeros of the integer weights (zero point 0): pruned weights survive int8.
        "onnx_sparsity": qdq.weight_sparsity,
        "int8_weights": len(qdq.weights),
        "int32_biases": qdq.int32_biases,
        "float_weights": qdq.float_weights,
        "weight_bits": bits,
        "weight_storage": "int8",
        "weight_levels_max": max((w["levels"] for w in qdq.weights.values()), default=0),
        "ort_int8_ops": {k: v for k, v in runtime_ops.items() if k in INT8_KERNEL_OPS},
        "ort_float_ops": {k: v for k, v in runtime_ops.items() if k in FLOAT_KERNEL_OPS},
        "bias_max_error": report["bias_max_error"],
        "target": report["target"],
        "int8_scheme": target.scheme.reason,
        "int8_ops": p.int8_ops,
    }
    if p.int8_ops == "onnxruntime":
        metrics["contrib_matmuls"] = report["contrib_matmuls"]  # MatMul + bias as one op
    float_matmuls = metrics["ort_float_ops"].get("MatMul", 0)
    if float_matmuls:
        # Transformers: QK^T and probs.V multiply two activations; only weight layers carry
        # a quantization state, so these stay float, and so does any weight in float_weights.
        metrics["float_matmuls"] = (
            f"{float_matmuls} MatMul(s) run in float: attention's activation x activation "
            "products (scores, weighted values) are not quantized"
            + (f"; nor are these weights: {', '.join(qdq.float_weights[:4])}"
               if qdq.float_weights else ""))
    if isinstance(bits, int) and bits < 8:
        metrics["note"] = (
            f"{bits}-bit weights exported on the int8 grid "
            f"({2**bits - 1} levels used); runs int8 kernels"
        )
    return metrics
