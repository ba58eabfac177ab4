"""``export.onnx``: fp32 or int8 QDQ ONNX with a dynamic batch, verified against PyTorch.

``format: fp32`` exports the model as it computes in PyTorch and enforces tight parity (a
quantized model's fake quantization then becomes float Div/Round/Clip/Mul ops: a simulation).
``format: int8`` needs a quantized model (``state["quantization"]``, e.g. from ``quant.rtn``)
and writes QuantizeLinear/DequantizeLinear with exactly the PyTorch scales, int8 weights and
int32 biases, laid out so onnxruntime fuses them into integer kernels. Integer kernels round
differently from PyTorch's float fake-quant (requantization), so int8 parity is judged by top-1
agreement and the largest logit difference relative to the largest logit.

The int8 grids follow the recipe's ``target`` (the CPU the file is for). When this machine's
onnxruntime kernels cannot compute the file exactly (e.g. full-range weights made for a VNNI
server, exported on an AVX2 laptop), parity is checked on onnxruntime's unfused QDQ reference
path instead, and the metrics say so; a parity failure names the first diverging node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slimline.artifact import Artifact
from slimline.params import ParamError, check_range, param
from slimline.stage import StageContext, register_stage


@dataclass
class ExportParams:
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
    parity_samples: int = param(64, help="test-split samples used for the parity check")
    filename: str = param("model.onnx", help="name of the exported file in the stage directory")

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ParamError("opset", f"must be at least 17, got {self.opset}")
        if self.parity_samples < 1:
            raise ParamError("parity_samples", "must be at least 1")
        check_range("int8_min_agreement", self.int8_min_agreement, 0.0, 1.0)
        if self.int8_max_rel_diff <= 0:
            raise ParamError("int8_max_rel_diff", "must be positive")
        if "/" in self.filename or not self.filename.endswith(".onnx"):
            raise ParamError(
                "filename", f"expected a plain name ending in .onnx, got {self.filename!r}"
            )


def exact_on_this_machine(path: Path) -> bool:
    """Whether this CPU's onnxruntime int8 kernels compute the file's weights exactly."""
    from slimline.export.int8numerics import exact_on

    return exact_on(path)


def not_exact_here_note(target: str) -> str:
    from slimline.export.machine import machine_info
    from slimline.export.target import target_for_machine

    here = target_for_machine(machine_info()).name
    return (
        f"made for {target}; this CPU ({here}) would saturate its full-range int8 weights, so "
        "the file was checked on onnxruntime's unfused QDQ reference path, not on integer "
        f"kernels: run `slimline profile FILE --verify-int8` on a {target} machine to check them"
    )


@register_stage("export.onnx", ExportParams, target_aware=True)
def export_onnx_stage(ctx: StageContext, inputs: list[Artifact], p: ExportParams) -> Artifact:
    """Export fp32 or int8 QDQ ONNX (opset >= 17, dynamic batch) and enforce parity."""
    from slimline.export import ExportError, check_parity, export_onnx, graph_summary

    out = inputs[0].derive()
    path = ctx.work_dir / p.filename
    int8: dict[str, Any] = {}
    try:
        if p.format == "int8":
            int8 = _export_int8(ctx, out, path, p)
        else:
            export_onnx(
                out.model, out.example_input(2), path, opset=p.opset, dynamic_batch=p.dynamic_batch
            )
    except ExportError as exc:
        raise ctx.fail(str(exc)) from None
    # Parity on real inputs, at a batch size other than the traced one when the batch is dynamic.
    x_test, _ = ctx.data.split("test")
    samples = x_test[: p.parity_samples] if p.dynamic_batch else x_test[:2]
    exact_here = p.format != "int8" or exact_on_this_machine(path)
    parity = check_parity(out.model, path, samples, atol=p.atol, rtol=p.rtol, optimize=exact_here)
    if p.format == "int8":
        passed = (
            parity.top1_agreement >= p.int8_min_agreement
            and parity.max_rel_diff <= p.int8_max_rel_diff
        )
        bounds = (
            f"needs top-1 agreement >= {p.int8_min_agreement} and max |diff| / max|logit| "
            f"<= {p.int8_max_rel_diff}"
        )
    else:
        passed = parity.passed
        bounds = f"atol {p.atol} + rtol {p.rtol} x max|logit|"
    if not passed:
        why = _int8_diagnosis(path, samples, exact_here) if p.format == "int8" else ""
        path.unlink(missing_ok=True)
        raise ctx.fail(
            f"onnxruntime {p.format} output differs from PyTorch: max |diff| = "
            f"{parity.max_abs_diff:.3g} (relative {parity.max_rel_diff:.3g}), top-1 "
            f"agreement {parity.top1_agreement:.3f}; {bounds}; {why}no file was kept"
        )
    summary = graph_summary(path)
    out.files["onnx"] = path
    out.metrics = {
        "format": p.format,
        "onnx_bytes": summary.file_bytes,
        "onnx_parameters": summary.parameter_count,
        "onnx_sparsity": summary.sparsity,
        "op_counts": summary.op_counts,
        "opset": p.opset,
        "max_abs_diff": parity.max_abs_diff,
        "max_rel_diff": parity.max_rel_diff,
        "top1_agreement": parity.top1_agreement,
        "parity_samples": len(samples),
        **int8,
    }
    if p.format == "int8":
        out.metrics["parity_backend"] = (
            "onnxruntime" if exact_here else "onnxruntime reference (unfused QDQ)"
        )
        if not exact_here:
            out.metrics["note"] = not_exact_here_note(ctx.target.name)
    return out


def _int8_diagnosis(path: Path, samples: Any, exact_here: bool) -> str:
    """The first diverging node (and the saturation signature), as the start of a sentence."""
    if not exact_here:
        return (
            "onnxruntime's reference path (no fused kernels) already differs, so the QDQ graph "
            "itself does not compute what PyTorch's fake-quant model does; "
        )
    from slimline.export.graph import graph_summary
    from slimline.export.int8numerics import explain_int8_mismatch
    from slimline.export.machine import machine_info

    name = graph_summary(path).inputs[0].name
    try:
        text = explain_int8_mismatch(path, {name: samples.numpy()}, machine=machine_info())
    except Exception as exc:  # a diagnosis must never hide the parity failure itself
        return f"(no node-level diagnosis: {type(exc).__name__}: {exc}); "
    return f"{text}; "


def _export_int8(ctx: StageContext, out: Artifact, path: Path, p: ExportParams) -> dict[str, Any]:
    """Write the int8 QDQ file; the int8-specific metrics."""
    from slimline.compress.quant import QDQExportError, attach_quantization, export_qdq_onnx
    from slimline.compress.quant.state import quantization_of
    from slimline.export.qdq import (
        FLOAT_KERNEL_OPS,
        INT8_KERNEL_OPS,
        ort_optimized_op_counts,
        qdq_summary,
    )

    state = out.state.get("quantization")
    if state is None:
        raise ctx.fail(
            "format 'int8' needs a quantized model, and the input artifact has no "
            "quantization state: put a quantization stage (e.g. quant.rtn) before "
            "this one in 'needs'. No file was written."
        )
    if quantization_of(out.model) is None:  # an in-memory artifact built without attaching
        attach_quantization(out.model, state)
    try:
        _, report = export_qdq_onnx(
            out.model, out.example_input(2), path, opset=p.opset, dynamic_batch=p.dynamic_batch,
            target=ctx.target,
        )
    except QDQExportError as exc:
        path.unlink(missing_ok=True)
        raise ctx.fail(str(exc)) from None
    qdq = qdq_summary(path)
    runtime_ops = ort_optimized_op_counts(path)
    info = state.get("info", {})
    bits = info.get("weight_bits")
    metrics = {
        # Literal zeros of the integer weights (zero point 0): pruned weights survive int8.
        "onnx_sparsity": qdq.weight_sparsity,
        "quantize_nodes": qdq.quantize_nodes,
        "dequantize_nodes": qdq.dequantize_nodes,
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
        "int8_scheme": ctx.target.scheme.reason,
    }
    if isinstance(bits, int) and bits < 8:
        metrics["note"] = (
            f"{bits}-bit weights exported on the int8 grid "
            f"({2**bits - 1} levels used); runs int8 kernels"
        )
    return metrics
