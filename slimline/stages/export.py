"""``export.onnx``: fp32 or int8 QDQ ONNX, checked against PyTorch on test-split samples: a thin
adapter over :func:`slimline.compress.deploy.export_model` (see there for what is checked and
how a file made for another CPU than this one is verified)."""

from __future__ import annotations

from slimline.artifact import Artifact
from slimline.compress.deploy import ExportConfig, export_model
from slimline.compress.methods import MethodError
from slimline.stage import StageContext, register_stage


@register_stage("export.onnx", ExportConfig, target_aware=True)
def export_onnx_stage(ctx: StageContext, inputs: list[Artifact], p: ExportConfig) -> Artifact:
    """Export fp32 or int8 QDQ ONNX (opset >= 17, dynamic batch) and enforce parity."""
    out = inputs[0].derive()
    if p.format == "int8":
        state = out.state.get("quantization")
        if state is None:
            raise ctx.fail(
                "format 'int8' needs a quantized model, and the input artifact has no "
                "quantization state: put a quantization stage (e.g. quant.rtn) before this one "
                "in 'needs'. No file was written."
            )
        from slimline.compress.quant import attach_quantization
        from slimline.compress.quant.state import quantization_of

        if quantization_of(out.model) is None:  # an in-memory artifact built without attaching
            attach_quantization(out.model, state)
    # Parity on real inputs, at a batch size other than the traced one when the batch is dynamic.
    x_test, _ = ctx.data.split("test")
    samples = x_test[: p.parity_samples] if p.dynamic_batch else x_test[:2]
    try:
        result = export_model(out.model, out.example_input(2), ctx.work_dir / p.filename, p,
                              parity_inputs=samples, target=ctx.target)
    except MethodError as exc:
        raise ctx.fail(str(exc)) from None
    out.files["onnx"] = result.path
    out.metrics = result.metrics
    return out
