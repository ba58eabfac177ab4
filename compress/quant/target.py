"""The deployment target as the quantizers see it: per-layer weight bit widths that the target's
onnxruntime int8 kernels compute exactly (see :mod:`slimline.export.target` for the why).

Every quantizer (RTN, data-free/DFQ, UDFC, QAT) asks :func:`layer_weight_bits` for the grid of
each layer, so the PyTorch fake-quant model, the :class:`~slimline.compress.quant.state.QuantState`
and the exported file use one grid, and :func:`scheme_record` writes what was chosen and why
into the state's ``info`` (and from there into the stage metrics and the report).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch.nn as nn

from slimline.export.int8numerics import weight_kernel
from slimline.export.target import (
    Target,
    TargetError,
    WeightKernel,
    fit_weight_bits,
    resolve_target,
)

__all__ = [
    "Target",
    "TargetError",
    "WeightGrid",
    "layer_weight_bits",
    "module_weight_kernel",
    "resolve_target",
    "scheme_record",
    "target_metrics",
]

WeightGrid = Literal["symmetric", "affine", "odd"]


def module_weight_kernel(module: nn.Module) -> WeightKernel:
    """Which onnxruntime kernel will run ``module`` once quantized (``depthwise`` or ``gemm``),
    by the same rule the ONNX-side checks use (:func:`slimline.export.int8numerics.weight_kernel`)."""
    if isinstance(module, nn.Conv2d):
        return weight_kernel("Conv", tuple(module.weight.shape), module.groups)
    return "gemm"


def layer_weight_bits(
    module: nn.Module, bits: int, target: Target | str | None, *, grid: WeightGrid = "symmetric"
) -> int:
    """``bits``, lowered until the layer's grid fits the target's exact weight range (7 instead
    of 8 for Conv/Linear on x86 without VNNI; unchanged for depthwise convs and elsewhere)."""
    scheme = resolve_target(target).scheme
    return fit_weight_bits(bits, scheme.weight_level(module_weight_kernel(module)), grid=grid)


def scheme_record(
    target: Target | str | None, requested_bits: int, used_bits: Mapping[str, int]
) -> dict[str, Any]:
    """What :class:`~slimline.compress.quant.state.QuantState` ``info`` records about the target:
    its name, the scheme and its reason, and the layers whose bit width it lowered."""
    resolved = resolve_target(target)
    lowered = {name: bits for name, bits in used_bits.items() if bits < requested_bits}
    return {
        "target": resolved.name,
        "int8_scheme": resolved.scheme.to_dict(),
        "weight_bits_lowered": lowered,
        "weight_bits_used": sorted(set(used_bits.values())),
    }


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
