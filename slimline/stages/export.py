"""``export.onnx``: fp32 or int8 QDQ ONNX, checked against PyTorch on test-split samples: a thin
adapter over :func:`slimline.compress.deploy.export_model` (see there for what is checked and
how a file made for another CPU than this one is verified). ``export.hf``: a transformers model
written back as a ``from_pretrained`` checkpoint (:mod:`slimline.models.hf_save`)."""

from __future__ import annotations

from dataclasses import dataclass

from slimline.artifact import Artifact
from slimline.compress.deploy import ExportConfig, export_model
from slimline.compress.methods import MethodError
from slimline.params import ParamError, param
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


@dataclass
class HFExportParams:
    directory: str = param("hf", help="folder (inside the stage folder) save_pretrained writes")
    check_samples: int = param(8, help="test-split inputs the reloaded checkpoint is compared on")
    atol: float = param(1e-5, help="largest output difference the reloaded checkpoint may show")
    pad: bool = param(True, help="a model no config describes (heads removed, per-layer FFN "
                      "widths) is written in the original shapes with those heads/channels as "
                      "zeros (same function, not smaller); false: refuse")

    def __post_init__(self) -> None:
        if not self.directory or self.directory in (".", "..") or "/" in self.directory:
            raise ParamError("directory", f"must be a plain folder name, got {self.directory!r}")
        if self.check_samples < 1:
            raise ParamError("check_samples", f"must be at least 1, got {self.check_samples}")


@register_stage("export.hf", HFExportParams)
def export_hf_stage(ctx: StageContext, inputs: list[Artifact], p: HFExportParams) -> Artifact:
    """Write a transformers model back as a checkpoint ``from_pretrained`` loads (dense,
    unstructured/N:M-pruned, or FFN-pruned to one width; with the source's tokenizer files),
    reloaded and compared before the stage ends; see :mod:`slimline.models.hf_save`."""
    from slimline.models.hf import resolve_hf_path
    from slimline.models.hf_save import HFSaveError, save_hf_pretrained

    out = inputs[0].derive()
    if out.state.get("quantization") is not None:
        raise ctx.fail("the model is quantized: a transformers checkpoint stores float weights; "
                       "export the int8 model with export.onnx (format: int8), or put export.hf "
                       "before the quantization stage")
    source = out.model_spec.get("hf")
    x_test, _ = ctx.data.split("test")
    try:
        result = save_hf_pretrained(
            out.model, ctx.work_dir / p.directory,
            source=resolve_hf_path(source) if source else None,
            check_inputs=x_test[: p.check_samples], atol=p.atol, pad=p.pad)
    except HFSaveError as exc:
        raise ctx.fail(str(exc)) from None
    out.files["hf"] = ctx.work_dir / p.directory
    result["zero_padded"] = len(result["zero_padded"])  # weights, not their names, in the report
    if result["zero_padded"]:
        ctx.log(f"no transformers config describes this model: {result['zero_padded']} weights "
                "written zero-padded to the original shapes (same function, not smaller)")
    out.metrics = {"hf_" + k: v for k, v in result.items()}
    return out
