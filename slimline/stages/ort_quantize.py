"""``export.ort_quantize``: int8 ONNX through ``onnxruntime.quantization`` (the PTQ baseline).

Takes the fp32 file of an ``export.onnx`` stage, quantizes it (static QDQ calibrated on training
inputs, or dynamic), and scores the int8 file with onnxruntime on a held-out split against the
fp32 file. The output artifact's ``files["onnx"]`` is the int8 file, so a following
``profile.latency`` times it. The artifact's PyTorch model is the unchanged fp32 one: an ``eval``
stage after this one scores PyTorch, not the int8 file; this stage's metrics are the int8 ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimline.artifact import Artifact
from slimline.params import ParamError, param
from slimline.stage import StageContext, register_stage


@dataclass
class OrtQuantizeParams:
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


@register_stage("export.ort_quantize", OrtQuantizeParams, target_aware=True)
def ort_quantize_stage(ctx: StageContext, inputs: list[Artifact], p: OrtQuantizeParams) -> Artifact:
    """int8 ONNX via onnxruntime.quantization (static QDQ or dynamic), scored against fp32."""
    source = inputs[0]
    producer = source.history[-1]["stage"] if source.history else "source"
    fp32_path = source.files.get("onnx")
    if fp32_path is None:
        raise ctx.fail(
            f"needs an fp32 ONNX file, but its input (stage {producer!r}) has none: "
            "put an export.onnx stage in its 'needs'"
        )
    from slimline.export.graph import OnnxFileError, graph_summary
    from slimline.export.ort_quant import QuantizationError, compare_onnx_models, ort_quantize
    from slimline.stages.export import exact_on_this_machine, not_exact_here_note

    calibration = None
    if p.mode == "static":
        seed = ctx.seed if p.calibration_seed is None else p.calibration_seed
        calibration = ctx.data.calibration(p.calibration_samples, seed=seed).numpy()
    path = ctx.work_dir / p.filename
    reduce_range = ctx.target.scheme.reduce_range if p.reduce_range is None else p.reduce_range
    try:
        ort_quantize(
            fp32_path,
            path,
            calibration=calibration,
            mode=p.mode,
            per_channel=p.per_channel,
            activation_type=p.activation_type,
            weight_type=p.weight_type,
            calibrate_method=p.calibrate_method,
            reduce_range=reduce_range,
            target=ctx.target,
        )
    except (QuantizationError, OnnxFileError, FileNotFoundError) as exc:
        raise ctx.fail(f"{exc} (fp32 file from stage {producer!r})") from None

    x, y = ctx.data.split(p.split)
    exact_here = exact_on_this_machine(path)
    scores = compare_onnx_models(fp32_path, path, x.numpy(), y.numpy(), batch_size=p.batch_size,
                                 int8_reference=not exact_here)
    summary, fp32_summary = graph_summary(path), graph_summary(fp32_path)
    out = source.derive()
    out.files["onnx"] = path
    out.metrics = {
        "split": p.split,
        "samples": scores.samples,
        "accuracy": scores.accuracy,  # of the int8 file, run by onnxruntime
        "fp32_accuracy": scores.fp32_accuracy,
        "int8_accuracy_change": scores.accuracy - scores.fp32_accuracy,
        "top1_agreement": scores.top1_agreement,
        "agreement": scores.top1_agreement,  # the report's agreement column
        "max_abs_logit_error": scores.max_abs_error,
        "mean_abs_logit_error": scores.mean_abs_error,
        "max_rel_logit_error": scores.max_rel_error,
        "onnx_bytes": summary.file_bytes,
        "fp32_onnx_bytes": fp32_summary.file_bytes,
        "size_ratio": summary.file_bytes / fp32_summary.file_bytes,
        "op_counts": summary.op_counts,
        "quant_format": summary.quant_format,
        "quantize_nodes": summary.quantize_nodes,
        "dequantize_nodes": summary.dequantize_nodes,
        "int8_initializers": summary.int8_initializers,
        "int8_bytes": summary.int8_bytes,
        "initializer_bytes_by_dtype": summary.initializer_bytes_by_dtype,
        "onnx_sparsity": summary.sparsity,
        "mode": p.mode,
        "per_channel": p.per_channel,
        "activation_type": p.activation_type if p.mode == "static" else "dynamic",
        "weight_type": p.weight_type,
        "calibration_samples": 0 if calibration is None else len(calibration),
        "source_stage": producer,
        "target": ctx.target.name,
        "reduce_range": reduce_range,
        "scored_with": "onnxruntime" if exact_here else "onnxruntime reference (unfused QDQ)",
    }
    if not exact_here:
        out.metrics["note"] = not_exact_here_note(ctx.target.name)
    return out
