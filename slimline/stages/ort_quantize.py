"""``export.ort_quantize``: int8 ONNX through ``onnxruntime.quantization`` (the PTQ baseline).

Takes the fp32 file of an ``export.onnx`` stage, quantizes it for the recipe's target (static
QDQ calibrated on training inputs, or dynamic; ``reduce_range`` as the target needs unless set),
and scores the int8 file with onnxruntime on a held-out split against the fp32 file. The output
artifact's ``files["onnx"]`` is the int8 file, so a following ``profile.latency`` times it. The
artifact's PyTorch model is the unchanged fp32 one: an ``eval`` stage after this one scores
PyTorch, not the int8 file; this stage's metrics are the int8 ones.
"""

from __future__ import annotations

from slimline.artifact import Artifact
from slimline.export.ort_quant import OrtQuantizeConfig
from slimline.stage import StageContext, register_stage


@register_stage("export.ort_quantize", OrtQuantizeConfig, target_aware=True)
def ort_quantize_stage(ctx: StageContext, inputs: list[Artifact], p: OrtQuantizeConfig) -> Artifact:
    """int8 ONNX via onnxruntime.quantization (static QDQ or dynamic), scored against fp32."""
    from slimline.compress.deploy import not_exact_here_note
    from slimline.export.graph import OnnxFileError
    from slimline.export.int8_evaluation import quantization_report
    from slimline.export.ort_quant import QuantizationError, ort_quantize

    source = inputs[0]
    producer = source.history[-1]["stage"] if source.history else "source"
    fp32_path = source.files.get("onnx")
    if fp32_path is None:
        raise ctx.fail(f"needs an fp32 ONNX file, but its input (stage {producer!r}) has none: "
                       "put an export.onnx stage in its 'needs'")
    calibration = None
    if p.mode == "static":
        seed = ctx.seed if p.calibration_seed is None else p.calibration_seed
        calibration = ctx.data.calibration(p.calibration_samples, seed=seed).numpy()
    path = ctx.work_dir / p.filename
    reduce_range = ctx.target.scheme.reduce_range if p.reduce_range is None else p.reduce_range
    try:
        ort_quantize(fp32_path, path, calibration=calibration, mode=p.mode,
                     per_channel=p.per_channel, activation_type=p.activation_type,
                     weight_type=p.weight_type, calibrate_method=p.calibrate_method,
                     reduce_range=reduce_range, target=ctx.target)
    except (QuantizationError, OnnxFileError, FileNotFoundError) as exc:
        raise ctx.fail(f"{exc} (fp32 file from stage {producer!r})") from None
    x, y = ctx.data.split(p.split)
    out = source.derive()
    out.files["onnx"] = path
    out.metrics = {
        **quantization_report(fp32_path, path, x.numpy(),
                              y.numpy() if ctx.data.task == "classification" else None, p,
                              reduce_range=reduce_range,
                              calibration_samples=0 if calibration is None else len(calibration)),
        "source_stage": producer,
        "reference": f"{producer} (fp32 ONNX)",  # what its fidelity figures compare against
        "target": ctx.target.name,
    }
    embedding = (ctx.data.task == "embedding"
                 or getattr(source.model, "output_kind", None) == "embedding")
    if embedding:  # an argmax of an embedding is no class: its cosine says how close it is
        out.metrics.pop("agreement")
        out.metrics.pop("top1_agreement")
    if not out.metrics.pop("exact_here"):
        out.metrics["note"] = not_exact_here_note(ctx.target.name)
    return out
