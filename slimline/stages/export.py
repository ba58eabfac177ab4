"""``export.onnx``: fp32 ONNX with a dynamic batch, verified against PyTorch before it counts."""

from __future__ import annotations

from dataclasses import dataclass

from slimline.artifact import Artifact
from slimline.params import ParamError, param
from slimline.stage import StageContext, register_stage


@dataclass
class ExportParams:
    opset: int = param(18, help="ONNX opset (>= 17)")
    dynamic_batch: bool = param(True, help="export the batch dimension as dynamic")
    atol: float = param(1e-4, help="parity: allowed max |onnxruntime - torch| (plus rtol)")
    rtol: float = param(1e-3, help="parity: tolerance relative to the largest |logit|")
    parity_samples: int = param(64, help="test-split samples used for the parity check")
    filename: str = param("model.onnx", help="name of the exported file in the stage directory")

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ParamError("opset", f"must be at least 17, got {self.opset}")
        if self.parity_samples < 1:
            raise ParamError("parity_samples", "must be at least 1")
        if "/" in self.filename or not self.filename.endswith(".onnx"):
            raise ParamError("filename", f"expected a plain name ending in .onnx, got "
                                         f"{self.filename!r}")


@register_stage("export.onnx", ExportParams)
def export_onnx_stage(ctx: StageContext, inputs: list[Artifact], p: ExportParams) -> Artifact:
    """Export fp32 ONNX (opset >= 17, dynamic batch) and enforce onnxruntime parity."""
    from export import ExportError, check_parity, export_onnx, graph_summary

    out = inputs[0].derive()
    path = ctx.work_dir / p.filename
    try:
        export_onnx(out.model, out.example_input(2), path, opset=p.opset,
                    dynamic_batch=p.dynamic_batch)
    except ExportError as exc:
        raise ctx.fail(str(exc)) from None
    # Parity on real inputs, at a batch size other than the traced one when the batch is dynamic.
    x_test, _ = ctx.data.split("test")
    samples = x_test[: p.parity_samples] if p.dynamic_batch else x_test[:2]
    parity = check_parity(out.model, path, samples, atol=p.atol, rtol=p.rtol)
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise ctx.fail(f"onnxruntime output differs from PyTorch: max |diff| = "
                       f"{parity.max_abs_diff:.3g} > atol {p.atol} + rtol {p.rtol} x max|logit| "
                       f"(top-1 agreement {parity.top1_agreement:.3f}); no file was kept")
    summary = graph_summary(path)
    out.files["onnx"] = path
    out.metrics = {
        "onnx_bytes": summary.file_bytes,
        "onnx_parameters": summary.parameter_count,
        "onnx_sparsity": summary.sparsity,
        "op_counts": summary.op_counts,
        "opset": p.opset,
        "max_abs_diff": parity.max_abs_diff,
        "top1_agreement": parity.top1_agreement,
        "parity_samples": len(samples),
    }
    return out
