"""Round-to-nearest post-training quantization with min/max activation observers (the baseline).

Weights: symmetric, per output channel (or per tensor), ``scale = max|w| / qmax`` and
round-to-nearest onto that grid. 2-8 bits; below 8 bits the weights use only the low-bit
levels but are stored, exported and run on the int8 grid (ONNX Runtime has no int4 conv).
Activations: 8-bit per-tensor, affine (uint8 by default, what x86 int8 kernels want) from the
min/max seen on a calibration set. Biases of quantized layers whose input is quantized are put
on the int32 grid ``scale_x * scale_w`` that integer kernels add them on, so the PyTorch model
computes what the int8 runtime computes.

Steps (:func:`quantize_rtn`): fold BatchNorm into convs, optionally smooth Linear inputs
(SmoothQuant, :mod:`slimline.compress.quant.smoothing`), choose activation points
(:mod:`slimline.compress.quant.placement`), quantize weights, calibrate activations on the model with
quantized weights, derive bias grids, attach everything (:func:`attach_quantization`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from slimline.compress.methods import (
    DataUse,
    MethodConfig,
    MethodError,
    MethodInputs,
    QuantizeResult,
    register_quantizer,
)
from slimline.compress.quant.fold import fold_batchnorm
from slimline.compress.quant.observers import observe_points
from slimline.compress.quant.placement import ActivationPlan, plan_activation_points
from slimline.compress.quant.smoothing import apply_smoothing, choose_smoothing
from slimline.compress.quant.spec import QuantSpec, affine_spec, symmetric_spec
from slimline.compress.quant.state import (
    QuantState,
    attach_quantization,
    quantization_of,
)
from slimline.compress.quant.target import (
    Target,
    layer_weight_bits,
    scheme_record,
    target_metrics,
)
from slimline.params import ParamError, check_regex, param

log = logging.getLogger(__name__)

__all__ = [
    "RTNConfig",
    "RTNResult",
    "bias_spec",
    "quantizable_modules",
    "quantize_rtn",
    "weight_spec_rtn",
]

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BIAS_BITS = 32


def quantizable_modules(model: nn.Module, skip: str | None = None) -> dict[str, nn.Module]:
    """Conv/Linear modules by name, minus those whose name matches the regex ``skip``.

    Left out as well, because a fake-quant hook on them would never run or would quantize
    another layer's weight: the ``out_proj`` of torch's ``nn.MultiheadAttention`` (its forward
    reads ``out_proj.weight`` directly, never calling the module; its fused ``in_proj_weight``
    is no Linear either, so torch attention stays float) and layers whose weight is tied to
    another module's (GPT-2's ``lm_head`` is its token embedding).
    """
    pattern = re.compile(skip) if skip else None
    from slimline.compress.prune.magnitude import own_parameter_names

    canonical = own_parameter_names(model)
    bypassed = {f"{name}.out_proj" if name else "out_proj"
                for name, module in model.named_modules()
                if isinstance(module, nn.MultiheadAttention)}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZABLE) and not (pattern and pattern.search(name))
        and name not in bypassed and canonical.get(id(module.weight)) == f"{name}.weight"
    }


def weight_spec_rtn(weight: torch.Tensor, bits: int, *, per_channel: bool = True) -> QuantSpec:
    """Symmetric narrow-range grid for a conv/linear weight: per output channel (axis 0)
    ``scale_c = max|W_c| / (2**(bits-1) - 1)``, or one scale for the tensor. Zero point 0, so
    pruned zeros stay exactly zero."""
    weight = weight.detach()
    if per_channel:
        max_abs = weight.abs().reshape(weight.shape[0], -1).amax(dim=1)
        return symmetric_spec(max_abs, bits, axis=0)
    return symmetric_spec(weight.abs().max(), bits)


@dataclass
class RTNResult:
    """What :func:`quantize_rtn` did (the state is also attached to the model)."""

    state: QuantState
    folded: list[tuple[str, str]]
    quantized: list[str]
    skipped: list[str]
    plan: ActivationPlan
    unobserved: list[str] = field(default_factory=list)


@torch.no_grad()
def quantize_rtn(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    weight_bits: int = 8,
    activation_bits: int = 8,
    activation_signed: bool = False,
    symmetric_activations: bool = False,
    per_channel: bool = True,
    skip: str | None = None,
    fold_bn: bool = True,
    batch_size: int = 64,
    target: Target | str | None = "auto",
    smoothing: float | str | None = None,
    smoothing_layers: str | None = None,
) -> RTNResult:
    """Quantize ``model`` in place (eval mode) and attach the fake-quant forward.

    ``calibration`` are model inputs (e.g. ``dataset.calibration(256)``); ``skip`` is a regex
    of Conv/Linear module names kept in float (e.g. ``"^conv1$|^fc$"``). Only 8-bit activations
    are supported: that is what integer kernels run. ``target`` is the CPU the int8 file will
    run on (``"auto"``: this one; see :mod:`slimline.export.target`): it can lower a layer's
    ``weight_bits`` to the range that CPU's kernels compute exactly. ``smoothing``: SmoothQuant
    on the Linear layers first (an alpha in [0, 1], or ``"auto"``: chosen per layer, see
    :func:`slimline.compress.quant.smoothing.choose_smoothing`); ``None`` leaves them as they are.
    ``smoothing_layers`` (a regex of Linear names) limits which layers it may touch.

    Raises:
        ValueError: bad bit widths, nothing to quantize, or a bias whose int32 grid overflows.
    """
    if not 2 <= weight_bits <= 8:
        raise ValueError(f"weight_bits must be in [2, 8], got {weight_bits}")
    if activation_bits != 8:
        raise ValueError(f"activation_bits must be 8 (int8 kernels), got {activation_bits}")
    model.eval()
    _no_nested_tensors(model)
    folded = fold_batchnorm(model) if fold_bn else []
    every, targets = quantization_targets(model, skip)
    bits = {name: layer_weight_bits(m, weight_bits, target) for name, m in targets.items()}

    def activation_grid(low: float, high: float) -> QuantSpec:
        return affine_spec(low, high, activation_bits, signed=activation_signed,
                           symmetric=symmetric_activations)

    divisors: dict[str, torch.Tensor] = {}
    if smoothing is not None:
        linears = _smoothable(model, targets, smoothing_layers)
        divisors = choose_smoothing(
            model, linears, calibration,
            alpha=smoothing, activation_grid=activation_grid, batch_size=batch_size,
            weight_grid=lambda n, w: weight_spec_rtn(w, bits[n], per_channel=per_channel))
        apply_smoothing(model, divisors)
    plan = plan_activation_points(model, targets, own_input=divisors)
    weights = {
        f"{name}.weight": weight_spec_rtn(module.weight, bits[name], per_channel=per_channel)
        for name, module in targets.items()
    }
    smoothed = {f"{name}:input": s for name, s in divisors.items()}
    # bakes the weights; the smoothing hooks divide what the observers below see
    attach_quantization(model, QuantState(weights=weights, method="rtn", smoothing=smoothed))

    observers = observe_points(model, plan.points, calibration, batch_size)
    activations = {
        point.key: activation_grid(observers[point.key].minimum, observers[point.key].maximum)
        for point in plan.points
        if observers[point.key].count
    }
    unobserved = [key for key, obs in observers.items() if not obs.count]

    add_bias_specs(weights, activations, targets, plan)
    state = QuantState(
        weights=weights,
        activations=activations,
        method="rtn",
        smoothing=smoothed,
        info={
            "weight_bits": weight_bits,
            "activation_bits": activation_bits,
            "activation_dtype": "int8" if activation_signed else "uint8",
            "symmetric_activations": symmetric_activations,
            "per_channel": per_channel,
            "smoothing": smoothing,
            "smoothing_layers": smoothing_layers,
            "smoothed_layers": len(divisors),
            "weight_storage": "int8",
            "weight_levels": 2**weight_bits - 1,
            "calibration_samples": int(len(calibration)),
            "skip": skip,
            "folded_batchnorm": [list(pair) for pair in folded],
            "placement_traced": plan.traced,
            **scheme_record(target, weight_bits, bits),
        },
    )
    attach_quantization(model, state)
    return RTNResult(
        state=state,
        folded=folded,
        quantized=list(targets),
        skipped=[name for name in every if name not in targets],
        plan=plan,
        unobserved=unobserved,
    )


def _no_nested_tensors(model: nn.Module) -> None:
    """Turn off nn.TransformerEncoder's nested-tensor path: it hands its layers NestedTensors
    (which no observer or fake-quant grid takes, and ONNX has no form of), and a quantized
    model's hooks keep it off its fused fast path anyway. Valid positions compute the same;
    padded ones are computed instead of zeroed."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def _smoothable(model: nn.Module, targets: dict[str, nn.Module],
                pattern: str | None) -> dict[str, nn.Linear]:
    """The Linears smoothing may touch: matching ``pattern``, and not reading a tensor that is
    quantized anyway (a Conv's or ReLU's output point): dividing an already quantized tensor
    and quantizing it again only adds a rounding."""
    regex = re.compile(pattern) if pattern else None
    linears = {n: m for n, m in targets.items()
               if isinstance(m, nn.Linear) and (regex is None or regex.search(n))}
    plain = plan_activation_points(model, targets).module_inputs
    kept = {p.key for p in plan_activation_points(model, targets, own_input=linears).points}
    return {n: m for n, m in linears.items()
            if not (n in plain and plain[n].where == "output" and plain[n].key in kept)}


def quantization_targets(
    model: nn.Module, skip: str | None
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(every, targets)``: all Conv/Linear modules and those not matching ``skip``; raises
    ValueError when ``skip`` leaves nothing to quantize."""
    every = quantizable_modules(model)
    targets = quantizable_modules(model, skip)
    if not targets:
        raise ValueError(
            f"no Conv/Linear layer to quantize (skip={skip!r} matches all of "
            f"{', '.join(every) or 'none'})"
        )
    return every, targets


def add_bias_specs(
    weights: dict[str, QuantSpec],
    activations: dict[str, QuantSpec],
    targets: dict[str, nn.Module],
    plan: ActivationPlan,
) -> None:
    """Add ``{name}.bias`` int32 specs to ``weights`` for every target layer with a bias whose
    input point has an activation spec (see :func:`bias_spec`)."""
    for name, module in targets.items():
        point = plan.module_inputs.get(name)
        if module.bias is None or point is None or point.key not in activations:
            continue
        weights[f"{name}.bias"] = bias_spec(
            activations[point.key], weights[f"{name}.weight"], module.bias, name
        )


def bias_spec(
    input_spec: QuantSpec, weight_spec: QuantSpec, bias: torch.Tensor, layer: str
) -> QuantSpec:
    """int32 grid of a bias added to an integer accumulator: ``scale_b = scale_x * scale_w``
    (per output channel), zero point 0 — the accumulator's own unit (Jacob et al., 2018, sec.
    2.4). The product is taken in float32, as the exporter does."""
    scale = (input_spec.scale * weight_spec.scale).to(torch.float32)
    spec = QuantSpec(
        bits=BIAS_BITS,
        signed=True,
        axis=0 if scale.ndim else None,
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int32),
    )
    levels = (bias.detach().float() / spec._view(spec.scale, 1)).abs().max()
    if float(levels) >= 2**24:  # float32 holds integers exactly only up to 2**24
        raise ValueError(
            f"{layer}: bias needs {float(levels):.3g} int32 levels of the input x "
            "weight scale; this layer cannot be quantized (add it to skip)"
        )
    return spec


# ---- the method behind slimline.quantize / the quant.rtn stage ---------------------------


@dataclass
class RTNConfig(MethodConfig):
    """Round-to-nearest per-channel weights + min/max-calibrated 8-bit activations (BN folded);
    calibrates on ``calibration_samples`` training inputs."""

    data: ClassVar[DataUse] = "required"

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
    smoothing: Literal["off", "auto"] | float = param(
        "off", help="SmoothQuant on Linear inputs (transformers' outlier channels): 'auto' picks "
        "alpha per layer by its output error (or leaves it), a number in [0, 1] is one alpha"
    )
    smoothing_layers: str | None = param(
        None, help="regex of the Linears smoothing may touch (default: all), e.g. "
        "'query|key|value|intermediate' for the LayerNorm-fed ones: one Mul fewer per layer"
    )

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
        check_regex("skip", self.skip)
        check_regex("smoothing_layers", self.smoothing_layers)
        if self.smoothing not in ("off", "auto") and (
            isinstance(self.smoothing, bool) or not isinstance(self.smoothing, (int, float))
            or not 0.0 <= self.smoothing <= 1.0
        ):
            raise ParamError("smoothing", f"'off', 'auto' or an alpha in [0, 1], got "
                                          f"{self.smoothing!r}")


@register_quantizer(RTNConfig)
def quantize_rtn_method(model: nn.Module, config: RTNConfig,
                        inputs: MethodInputs) -> QuantizeResult:
    p = config
    refuse_quantized(model)
    calibration = inputs.require_data("quant.rtn").calibration(p.calibration_samples,
                                                                seed=inputs.seed)
    try:
        result = quantize_rtn(
            model,
            calibration,
            weight_bits=p.weight_bits,
            activation_bits=p.activation_bits,
            activation_signed=p.activation_dtype == "int8",
            symmetric_activations=p.symmetric,
            per_channel=p.per_channel,
            skip=p.skip,
            fold_bn=p.fold_bn,
            target=inputs.target,
            smoothing=None if p.smoothing == "off" else p.smoothing,
            smoothing_layers=p.smoothing_layers,
        )
    except ValueError as exc:
        raise MethodError(str(exc)) from None
    levels = 2**p.weight_bits - 1
    metrics: dict[str, Any] = {
        "method": "rtn",
        "weight_bits": p.weight_bits,
        "weight_levels": levels,
        "weight_storage": "int8",
        "activation_bits": p.activation_bits,
        "activation_dtype": p.activation_dtype,
        "per_channel": p.per_channel,
        "smoothed_layers": len(result.state.smoothing),
        "quantized_layers": len(result.quantized),
        "float_layers": result.skipped,
        "activation_points": len(result.state.activations),
        "folded_batchnorm": len(result.folded),
        "calibration_samples": len(calibration),
        "placement": "fx graph" if result.plan.traced else "module inputs (fx trace failed)",
        **target_metrics(result.state.info),
    }
    if p.weight_bits < 8:
        metrics["note"] = (
            f"{p.weight_bits}-bit weights: {levels} levels, stored and run on the int8 grid "
            "(no int4 kernels); no size or speed gain over int8 from the lower bit width"
        )
    if result.unobserved:
        metrics["unobserved_points"] = result.unobserved
    log.info("%d layers quantized (%d smoothed), %d kept in float, %d BatchNorms folded; "
             "target %s", len(result.quantized), len(result.state.smoothing),
             len(result.skipped), len(result.folded), metrics["target"])
    return QuantizeResult(model, result.state, metrics)


def refuse_quantized(model: nn.Module) -> None:
    """A :class:`MethodError` for a model that already carries a quantization state."""
    state = quantization_of(model)
    if state is not None:
        raise MethodError(f"the model is already quantized (method {state.method!r}); quantize "
                          "the float model instead")
