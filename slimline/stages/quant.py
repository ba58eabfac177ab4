"""``quant.rtn``: round-to-nearest int8 (2-8 bit) weights, min/max-calibrated 8-bit activations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from slimline.artifact import Artifact
from slimline.params import ParamError, param
from slimline.stage import StageContext, register_stage


@dataclass
class RTNParams:
    weight_bits: int = param(8, help="weight bits, 2-8 (below 8: low-bit levels on the int8 grid)")
    activation_bits: int = param(8, help="activation bits (8: what int8 kernels run)")
    activation_dtype: Literal["uint8", "int8"] = param(
        "uint8", help="activation grid; uint8 is what x86 onnxruntime fuses best (U8S8)"
    )
    per_channel: bool = param(True, help="one weight scale per output channel (else per tensor)")
    symmetric: bool = param(False, help="symmetric activation grid (default: min/max affine)")
    calibration_samples: int = param(256, help="training inputs used to observe activations")
    skip: str | None = param(None, help="regex of Conv/Linear names kept in float, e.g. '^fc$'")
    fold_bn: bool = param(True, help="fold BatchNorm into the preceding conv first")

    def __post_init__(self) -> None:
        if not 2 <= self.weight_bits <= 8:
            raise ParamError("weight_bits", f"must be in [2, 8], got {self.weight_bits}")
        if self.activation_bits != 8:
            raise ParamError(
                "activation_bits",
                f"only 8-bit activations are supported (int8 kernels), got {self.activation_bits}",
            )
        if self.calibration_samples < 1:
            raise ParamError("calibration_samples", "must be at least 1")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as exc:
                raise ParamError("skip", f"invalid regular expression: {exc}") from None


def target_metrics(info: dict[str, Any]) -> dict[str, Any]:
    """The deployment-target part of a quantization stage's metrics (from ``QuantState.info``,
    see :func:`slimline.compress.quant.target.scheme_record`): which target, its scheme and
    why, and how many layers got fewer weight bits than asked for."""
    scheme = info.get("int8_scheme") or {}
    return {
        "target": info.get("target"),
        "int8_scheme": scheme.get("reason"),
        "weight_bits_used": info.get("weight_bits_used"),
        "weight_bits_lowered": len(info.get("weight_bits_lowered") or {}),
    }


@register_stage("quant.rtn", RTNParams, target_aware=True)
def quant_rtn(ctx: StageContext, inputs: list[Artifact], p: RTNParams) -> Artifact:
    """Round-to-nearest per-channel weights + min/max activation calibration (BN folded)."""
    from slimline.compress.quant import quantize_rtn

    source = inputs[0]
    if "quantization" in source.state:
        method = source.state["quantization"].get("method", "?")
        raise ctx.fail(
            f"the input model is already quantized (method {method!r}); quantize "
            "the float model instead"
        )
    out = source.derive(copy_model=True)
    calibration = ctx.data.calibration(p.calibration_samples, seed=ctx.seed)
    try:
        result = quantize_rtn(
            out.model,
            calibration,
            weight_bits=p.weight_bits,
            activation_bits=p.activation_bits,
            activation_signed=p.activation_dtype == "int8",
            symmetric_activations=p.symmetric,
            per_channel=p.per_channel,
            skip=p.skip,
            fold_bn=p.fold_bn,
            target=ctx.target,
        )
    except ValueError as exc:
        raise ctx.fail(str(exc)) from None
    out.state["quantization"] = result.state.to_dict()
    levels = 2**p.weight_bits - 1
    out.metrics = {
        "method": "rtn",
        "weight_bits": p.weight_bits,
        "weight_levels": levels,
        "weight_storage": "int8",
        "activation_bits": p.activation_bits,
        "activation_dtype": p.activation_dtype,
        "per_channel": p.per_channel,
        "quantized_layers": len(result.quantized),
        "float_layers": result.skipped,
        "activation_points": len(result.state.activations),
        "folded_batchnorm": len(result.folded),
        "calibration_samples": len(calibration),
        "placement": "fx graph" if result.plan.traced else "module inputs (fx trace failed)",
        **target_metrics(result.state.info),
    }
    if p.weight_bits < 8:
        out.metrics["note"] = (
            f"{p.weight_bits}-bit weights: {levels} levels, stored and run "
            "on the int8 grid (no int4 kernels); no size or speed gain over "
            "int8 from the lower bit width"
        )
    if result.unobserved:
        out.metrics["unobserved_points"] = result.unobserved
    ctx.log(
        f"{len(result.quantized)} layers quantized, {len(result.skipped)} kept in float, "
        f"{len(result.folded)} BatchNorms folded; target {ctx.target.name}"
    )
    return out
