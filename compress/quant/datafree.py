"""Data-free post-training quantization into the shared :class:`QuantState`.

:func:`quantize_datafree` is :func:`slimline.compress.quant.rtn.quantize_rtn` without the calibration
set: BatchNorm is folded, weights are rounded to nearest on a symmetric (or asymmetric) grid
per channel (or per tensor), and every activation point gets its 8-bit grid from the BatchNorm
statistics (:mod:`slimline.compress.quant.bn_statistics`: ``mean +- range_sigmas * std`` per channel,
clipped by ReLU/ReLU6, carried through adds and pools). A calibration set may still be given
(min/max observers, as RTN); the data-free stages never give one.

DFQ's three steps (:mod:`slimline.compress.quant.dfq`) run here too when asked, in the paper's order:
fold BN, equalize, absorb high biases, quantize weights, correct biases. UDFC
(:mod:`slimline.compress.quant.udfc`) rescales layers before calling this with the same weight grids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from slimline.compress.methods import (
    MethodConfig,
    MethodError,
    MethodInputs,
    QuantizeResult,
    register_quantizer,
)
from slimline.compress.prune.layer_chains import find_layer_chains
from slimline.compress.quant.bn_statistics import (
    ChannelStats,
    DataFreeRangeError,
    bn_output_stats,
    propagate_stats,
)
from slimline.compress.quant.fold import conv_bn_pairs, fold_batchnorm
from slimline.compress.quant.observers import observe_points
from slimline.compress.quant.placement import ActivationPlan, plan_activation_points
from slimline.compress.quant.rtn import (
    add_bias_specs,
    quantization_targets,
    weight_spec_rtn,
)
from slimline.compress.quant.spec import QuantSpec, affine_spec
from slimline.compress.quant.state import QuantState, TensorPoint, attach_quantization
from slimline.compress.quant.target import (
    Target,
    layer_weight_bits,
    scheme_record,
    target_metrics,
)
from slimline.params import ParamError, check_regex, param

__all__ = ["DFQConfig", "DataFreeConfig", "DataFreeRangeError", "DataFreeResult",
           "quantize_datafree", "weight_spec"]


@dataclass
class DataFreeResult:
    """What :func:`quantize_datafree` did (the state is also attached to the model)."""

    state: QuantState
    folded: list[tuple[str, str]]
    quantized: list[str]
    skipped: list[str]
    plan: ActivationPlan
    ranges: str  # "bn statistics" or "calibration"
    dfq: dict[str, Any] = field(default_factory=dict)


def weight_spec(
    weight: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True
) -> QuantSpec:
    """Weight grid: symmetric = :func:`~slimline.compress.quant.rtn.weight_spec_rtn` (zero point 0,
    narrow range); asymmetric = signed affine grid over each channel's [min, max] (zero
    included), with a per-channel zero point."""
    if symmetric:
        return weight_spec_rtn(weight, bits, per_channel=per_channel)
    weight = weight.detach().float()
    rows = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    low = rows.amin(1).clamp(max=0)
    high = rows.amax(1).clamp(min=0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (high - low) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = (qmin - torch.round(low / scale)).clamp(qmin, qmax)
    if per_channel:
        return QuantSpec(bits=bits, signed=True, axis=0, scale=scale, zero_point=zero_point)
    return QuantSpec(bits=bits, signed=True, scale=scale[0], zero_point=zero_point[0])


@torch.no_grad()
def quantize_datafree(
    model: nn.Module,
    *,
    weight_bits: int = 8,
    per_channel: bool = True,
    symmetric_weights: bool = True,
    activation_bits: int = 8,
    activation_signed: bool = False,
    symmetric_activations: bool = False,
    range_sigmas: float = 6.0,
    input_std: float = 1.0,
    calibration: torch.Tensor | None = None,
    skip: str | None = None,
    equalize: bool = False,
    absorb_high_bias: bool = False,
    correct_bias: bool = False,
    method: str = "datafree",
    info: dict[str, Any] | None = None,
    target: Target | str | None = "auto",
) -> DataFreeResult:
    """Quantize ``model`` in place (eval mode) without data and attach the fake-quant forward.

    Args:
        weight_bits: 2-16 (the int8 exporter takes at most 8).
        range_sigmas: activation grids cover ``mean +- range_sigmas * std`` of the BN model.
        input_std: the model input is taken as ``N(0, input_std^2)`` per element.
        calibration: optional model inputs; then activation ranges are observed min/max.
        equalize, absorb_high_bias, correct_bias: DFQ's steps (see :mod:`slimline.compress.quant.dfq`).
        target: the CPU the int8 file is for (``"auto"``: this one); it can lower a layer's
            bit width to what that CPU's kernels compute exactly (:mod:`slimline.export.target`).

    Raises:
        ValueError: bad bit widths or nothing to quantize.
        DataFreeRangeError: an activation point whose range has no data-free rule (named).
    """
    from slimline.compress.quant import dfq

    if not 2 <= weight_bits <= 16:
        raise ValueError(f"weight_bits must be in [2, 16], got {weight_bits}")
    if activation_bits != 8:
        raise ValueError(f"activation_bits must be 8 (int8 kernels), got {activation_bits}")
    if range_sigmas <= 0 or input_std <= 0:
        raise ValueError("range_sigmas and input_std must be positive")
    model.eval()
    pairs = conv_bn_pairs(model)
    stats = bn_output_stats(model, pairs, range_sigmas)
    folded = fold_batchnorm(model)
    stats = {layer: stats[layer] for layer, _ in folded}
    report: dict[str, Any] = {}
    chains = list(find_layer_chains(model).values()) if (equalize or absorb_high_bias) else []
    if equalize:
        report["equalized"] = dfq.equalize(model, chains, stats)
    if absorb_high_bias:
        report["absorbed"] = dfq.absorb_high_biases(model, chains, stats)

    every, targets = quantization_targets(model, skip)
    plan = plan_activation_points(model, targets, inside_leaves=False)  # no run time
    node_stats = propagate_stats(model, stats, sigmas=range_sigmas, input_std=input_std)
    float_weights = {name: module.weight.detach().clone() for name, module in targets.items()}
    bits = {
        name: layer_weight_bits(
            module, weight_bits, target, grid="symmetric" if symmetric_weights else "affine"
        )
        for name, module in targets.items()
    }
    weights = {
        f"{name}.weight": weight_spec(
            module.weight, bits[name], per_channel=per_channel, symmetric=symmetric_weights
        )
        for name, module in targets.items()
    }
    attach_quantization(model, QuantState(weights=weights, method=method))  # bakes the weights
    if correct_bias:
        report["bias_corrected"] = dfq.correct_bias(model, float_weights, node_stats)

    if calibration is None:
        activations = {
            point.key: _range_spec(
                point, node_stats, activation_bits, activation_signed, symmetric_activations
            )
            for point in plan.points
        }
    else:
        activations = _observed_specs(
            model,
            plan.points,
            calibration,
            activation_bits,
            activation_signed,
            symmetric_activations,
        )
    add_bias_specs(weights, activations, targets, plan)
    ranges = "bn statistics" if calibration is None else "calibration"
    state = QuantState(
        weights=weights,
        activations=activations,
        method=method,
        info={
            "weight_bits": weight_bits,
            "activation_bits": activation_bits,
            "activation_dtype": "int8" if activation_signed else "uint8",
            "symmetric_activations": symmetric_activations,
            "symmetric_weights": symmetric_weights,
            "per_channel": per_channel,
            "weight_storage": "int8" if weight_bits <= 8 else "int16",
            "weight_levels": 2**weight_bits - 1,
            "activation_ranges": ranges,
            "range_sigmas": range_sigmas,
            "input_std": input_std,
            "calibration_samples": 0 if calibration is None else int(len(calibration)),
            "skip": skip,
            "folded_batchnorm": [list(pair) for pair in folded],
            "placement_traced": plan.traced,
            **scheme_record(target, weight_bits, bits),
            **(info or {}),
        },
    )
    attach_quantization(model, state)
    return DataFreeResult(
        state=state,
        folded=folded,
        quantized=list(targets),
        skipped=[name for name in every if name not in targets],
        plan=plan,
        ranges=ranges,
        dfq=report,
    )


def _range_spec(
    point: TensorPoint,
    node_stats: dict[str, ChannelStats | DataFreeRangeError],
    bits: int,
    signed: bool,
    symmetric: bool,
) -> QuantSpec:
    stats = node_stats.get(point.key)
    if isinstance(stats, DataFreeRangeError):
        raise DataFreeRangeError(f"the {point}: {stats}") from None
    if stats is None:
        raise DataFreeRangeError(f"the {point} is not in the traced graph")
    low, high = stats.range
    return affine_spec(low, high, bits, signed=signed, symmetric=symmetric)


def _observed_specs(
    model: nn.Module,
    points: list[TensorPoint],
    calibration: torch.Tensor,
    bits: int,
    signed: bool,
    symmetric: bool,
    batch_size: int = 64,
) -> dict[str, QuantSpec]:
    """Min/max of each point over ``calibration`` (the model already has quantized weights)."""
    observers = observe_points(model, points, calibration, batch_size)
    return {
        key: observer.spec(bits, signed=signed, symmetric=symmetric)
        for key, observer in observers.items()
        if observer.count
    }


# ---- the methods behind slimline.quantize / quant.datafree and quant.dfq ------------------


@dataclass
class DataFreeConfig(MethodConfig):
    """Round-to-nearest weights, activation ranges from BatchNorm statistics; never reads data."""

    weight_bits: int = param(8, help="weight bits, 2-8 (below 8: low-bit levels on the int8 grid)")
    per_channel: bool = param(True, help="one weight scale per output channel (else per tensor)")
    symmetric_weights: bool = param(
        True, help="symmetric weight grid (zero point 0; what int8 kernels want)"
    )
    activation_dtype: Literal["uint8", "int8"] = param(
        "uint8", help="activation grid; uint8 is what x86 onnxruntime fuses best (U8S8)"
    )
    symmetric_activations: bool = param(False, help="symmetric activation grid")
    range_sigmas: float = param(
        6.0, help="activation grids cover BN mean +- this many BN standard deviations"
    )
    input_std: float = param(1.0, help="model input taken as N(0, input_std^2) (standardised)")
    skip: str | None = param(None, help="regex of Conv/Linear names kept in float")

    def __post_init__(self) -> None:
        if not 2 <= self.weight_bits <= 8:
            raise ParamError("weight_bits", f"must be in [2, 8], got {self.weight_bits}")
        if self.range_sigmas <= 0:
            raise ParamError("range_sigmas", f"must be positive, got {self.range_sigmas}")
        if self.input_std <= 0:
            raise ParamError("input_std", f"must be positive, got {self.input_std}")
        check_regex("skip", self.skip)


@dataclass
class DFQConfig(DataFreeConfig):
    """DFQ (Nagel et al. 2019): cross-layer equalization, high-bias absorption and bias
    correction, then :class:`DataFreeConfig`'s quantization; no data."""

    equalize: bool = param(True, help="cross-layer equalization of conv -> ReLU -> conv pairs")
    absorb_high_bias: bool = param(True, help="move BN mean - 3 std into the next layer's bias")
    correct_bias: bool = param(True, help="analytic bias correction from BN statistics")


def datafree_kwargs(config: DataFreeConfig, target: Any) -> dict[str, Any]:
    """:func:`quantize_datafree`'s keyword arguments for ``config`` (also UDFC's)."""
    return {
        "target": target,
        "weight_bits": config.weight_bits,
        "per_channel": config.per_channel,
        "symmetric_weights": config.symmetric_weights,
        "range_sigmas": config.range_sigmas,
        "activation_signed": config.activation_dtype == "int8",
        "symmetric_activations": config.symmetric_activations,
        "input_std": config.input_std,
        "skip": config.skip,
    }


def datafree_metrics(result: DataFreeResult, config: DataFreeConfig,
                     method: str) -> dict[str, Any]:
    metrics = {
        "method": method,
        "weight_bits": config.weight_bits,
        "weight_levels": 2**config.weight_bits - 1,
        "weight_storage": "int8",
        "activation_bits": 8,
        "activation_dtype": config.activation_dtype,
        "per_channel": config.per_channel,
        "activation_ranges": result.ranges,
        "range_sigmas": config.range_sigmas,
        "data_used": False,
        "quantized_layers": len(result.quantized),
        "float_layers": result.skipped,
        "activation_points": len(result.state.activations),
        "folded_batchnorm": len(result.folded),
        **result.dfq,
        **target_metrics(result.state.info),
    }
    if "bias_corrected" in metrics:
        metrics["bias_corrected"] = len(metrics["bias_corrected"])
    return metrics


def require_batchnorm(model: nn.Module, stage: str) -> None:
    """Refuse, naming the alternative, a model without BatchNorm: the data-free quantizers take
    every activation range (and UDFC its compensation) from BatchNorm statistics."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    raise MethodError(
        f"{stage} takes every activation range from BatchNorm statistics, and "
        f"{type(model).__name__} has no BatchNorm"
        + (f" (it normalises with {', '.join(norms)}: a transformer?)" if norms else "")
        + "; use quant.rtn, which calibrates its ranges on a few unlabeled batches "
        "(no training)")


@register_quantizer(DataFreeConfig)
@register_quantizer(DFQConfig)
def quantize_datafree_method(model: nn.Module, config: DataFreeConfig,
                             inputs: MethodInputs) -> QuantizeResult:
    from slimline.compress.quant.rtn import refuse_quantized

    refuse_quantized(model)
    is_dfq = isinstance(config, DFQConfig)
    require_batchnorm(model, "quant.dfq" if is_dfq else "quant.datafree")
    steps = ({"equalize": config.equalize, "absorb_high_bias": config.absorb_high_bias,
              "correct_bias": config.correct_bias} if isinstance(config, DFQConfig) else {})
    method = "dfq" if is_dfq else "datafree"
    try:
        result = quantize_datafree(model, **datafree_kwargs(config, inputs.target),
                                   method=method, **steps)
    except (ValueError, DataFreeRangeError) as exc:
        raise MethodError(str(exc)) from None
    return QuantizeResult(model, result.state, datafree_metrics(result, config, method))
