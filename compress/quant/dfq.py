"""DFQ: cross-layer equalization, high-bias absorption and analytic bias correction.

Nagel, van Baalen, Blankevoort & Welling, 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction" (ICCV). All three act on a BN-folded model, on the
:class:`~slimline.compress.prune.layer_chains.LayerChain` pairs ``layer -> ReLU -> consumer``, with the
per-channel pre-activation statistics ``N(beta, gamma^2)`` the folded BatchNorms left
(:mod:`slimline.compress.quant.bn_statistics`), which these functions keep up to date.

ReLU6 (MobileNetV2) is not positively homogeneous: ``relu6(x / s) * s != relu6(x)`` where the
clip at 6 is reached. The paper replaces ReLU6 by ReLU; we cannot change the architecture, so a
ReLU6 channel is rescaled (or shifted) only where its statistics say it never reaches the clip
(``mean + sigmas * std <= 6``), and then only so far that it still does not (``s >= high / 6``).
Other ReLU6 channels are left alone, which limits DFQ on MobileNetV2 compared to the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimline.compress.prune.layer_chains import LayerChain, is_depthwise
from slimline.compress.quant.bn_statistics import ChannelStats, DataFreeRangeError

__all__ = ["absorb_high_biases", "correct_bias", "equalization_scales", "equalize"]

_RELU6_CLIP = 6.0


def equalization_scales(out_ranges: torch.Tensor, in_ranges: torch.Tensor) -> torch.Tensor:
    """``s_i = sqrt(r1_i / r2_i)`` (Nagel et al., eq. 11: ``s_i = sqrt(r1_i r2_i) / r2_i``).

    Dividing output channel ``i`` of the first layer by ``s_i`` and multiplying input channel
    ``i`` of the second by ``s_i`` gives both the range ``sqrt(r1_i r2_i)``, the scaling that
    maximises the summed per-channel precision. A channel with a zero range keeps ``s = 1``.
    """
    ok = (out_ranges > 0) & (in_ranges > 0)
    ratio = torch.where(
        ok,
        out_ranges / torch.where(ok, in_ranges, torch.ones_like(in_ranges)),
        torch.ones_like(out_ranges),
    )
    return ratio.sqrt()


def _consumer_columns(consumer: nn.Module, kind: str) -> torch.Tensor:
    """The consumer's weights grouped by input channel: (C, everything else)."""
    weight = consumer.weight.detach()
    if kind == "depthwise":  # input channel c is output channel c
        return weight.flatten(1)
    return weight.transpose(0, 1).flatten(1)


def _scale_consumer(consumer: nn.Module, kind: str, factors: torch.Tensor) -> None:
    weight = consumer.weight
    shape = [1] * weight.ndim
    axis = 0 if kind == "depthwise" else 1
    shape[axis] = -1
    weight.mul_(factors.to(weight.dtype).reshape(shape))


def _relu6_limits(
    chain: LayerChain, stats: ChannelStats | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eligible, least scale) per channel: ReLU channels any s > 0; ReLU6 see module doc."""
    if chain.activation_kind == "relu":
        return torch.ones(channels, dtype=torch.bool), torch.zeros(channels, dtype=torch.float64)
    if stats is None:
        return torch.zeros(channels, dtype=torch.bool), torch.zeros(channels, dtype=torch.float64)
    high = stats.expand(channels).high
    return high <= _RELU6_CLIP, (high / _RELU6_CLIP).clamp(min=0)


@torch.no_grad()
def equalize(
    model: nn.Module,
    chains: list[LayerChain],
    stats: dict[str, ChannelStats],
    *,
    iterations: int = 100,
    tolerance: float = 1e-6,
) -> int:
    """Cross-layer equalization of every chain, repeated until the scales settle (a layer can
    be the second of one pair and the first of the next: depthwise blocks). In place; updates
    ``stats``; returns the number of chains equalized. The fp32 function is unchanged (exactly
    for ReLU, and for the ReLU6 channels it touches, within the BN-statistics range)."""
    used = [c for c in chains if c.norm is None]  # after folding the BN is an Identity
    for _ in range(iterations):
        largest = 0.0
        for chain in used:
            layer = model.get_submodule(chain.layer)
            consumer = model.get_submodule(chain.consumer)
            weight = layer.weight
            channels = weight.shape[0]
            out_ranges = weight.detach().double().flatten(1).abs().amax(1)
            in_ranges = _consumer_columns(consumer, chain.consumer_kind).double().abs().amax(1)
            scales = equalization_scales(out_ranges, in_ranges)
            eligible, least = _relu6_limits(chain, stats.get(chain.layer), channels)
            scales = torch.where(eligible, torch.maximum(scales, least), torch.ones_like(scales))
            weight.div_(scales.to(weight.dtype).reshape(-1, *([1] * (weight.ndim - 1))))
            if layer.bias is not None:
                layer.bias.div_(scales.to(layer.bias.dtype))
            _scale_consumer(consumer, chain.consumer_kind, scales)
            if chain.layer in stats:
                old = stats[chain.layer].expand(channels)
                stats[chain.layer] = ChannelStats(
                    old.mean / scales, old.std / scales, old.low / scales, old.high / scales
                )
            largest = max(largest, float(scales.log().abs().max()))
        if largest < tolerance:
            break
    return len(used)


@torch.no_grad()
def absorb_high_biases(
    model: nn.Module,
    chains: list[LayerChain],
    stats: dict[str, ChannelStats],
    *,
    sigmas: float = 3.0,
) -> int:
    """Move ``c = max(0, beta - sigmas * gamma)`` (Nagel et al., sec. 4.1.1, eq. 15) from each
    layer's bias into its consumer's bias: ``b1 -= c``, ``b2 += W2 c``.

    Exact where the pre-activation stays above ``c`` (ReLU then passes the shift through), up
    to zero padding at the consumer's borders, where the padded zeros carry no ``c``. Returns
    the number of chains that absorbed something. Updates ``stats``.
    """
    absorbed = 0
    for chain in chains:
        if chain.norm is not None or chain.layer not in stats:
            continue
        layer = model.get_submodule(chain.layer)
        consumer = model.get_submodule(chain.consumer)
        if layer.bias is None:
            continue
        channels = layer.weight.shape[0]
        current = stats[chain.layer].expand(channels)
        shift = (current.mean - sigmas * current.std).clamp(min=0)
        if chain.activation_kind == "relu6":
            shift = torch.where(current.high <= _RELU6_CLIP, shift, torch.zeros_like(shift))
        if not bool((shift > 0).any()):
            continue
        if consumer.bias is None:
            out = consumer.weight.shape[0]
            consumer.bias = nn.Parameter(
                torch.zeros(out, dtype=consumer.weight.dtype),
                requires_grad=consumer.weight.requires_grad,
            )
        columns = consumer.weight.detach().double()
        if chain.consumer_kind == "depthwise":
            added = columns.flatten(1).sum(1) * shift
        else:
            added = columns.flatten(2).sum(2) @ shift if columns.ndim > 2 else columns @ shift
        layer.bias.sub_(shift.to(layer.bias.dtype))
        consumer.bias.add_(added.to(consumer.bias.dtype))
        stats[chain.layer] = ChannelStats(
            current.mean - shift, current.std, current.low - shift, current.high - shift
        )
        absorbed += 1
    return absorbed


@torch.no_grad()
def correct_bias(
    model: nn.Module,
    float_weights: dict[str, torch.Tensor],
    node_stats: dict[str, ChannelStats | DataFreeRangeError],
) -> list[str]:
    """Analytic bias correction (Nagel et al., sec. 4.2, eq. 17): ``b -= (W~ - W) E[x]``.

    ``W`` are the float weights (by layer name), ``W~`` the model's quantized ones, ``E[x]``
    the per-channel input means from the BN statistics (a ReLU input's mean is the clipped
    normal's, eq. 19-20). The expected output of each layer then matches the float one. Layers
    whose input mean has no data-free rule are skipped; the model input counts as mean 0, so
    the first layer needs no correction. Returns the corrected layers.
    """
    corrected = []
    for name, original in float_weights.items():
        stats = node_stats.get(f"{name}:input")
        if not isinstance(stats, ChannelStats):
            continue
        layer = model.get_submodule(name)
        error = (layer.weight.detach() - original).double()
        depthwise = is_depthwise(layer)
        if getattr(layer, "groups", 1) > 1 and not depthwise:
            continue  # grouped conv: inputs per group; no rule here
        in_channels = error.shape[0] if depthwise else error.shape[1]
        try:
            mean = stats.expand(in_channels).mean
        except ValueError:
            mean = stats.scalar().expand(in_channels).mean
        if depthwise:
            shift = error.flatten(1).sum(1) * mean
        else:
            shift = (error.flatten(2).sum(2) if error.ndim > 2 else error) @ mean
        if not bool(shift.abs().max() > 0):
            continue
        if layer.bias is None:
            layer.bias = nn.Parameter(
                torch.zeros(error.shape[0], dtype=layer.weight.dtype),
                requires_grad=layer.weight.requires_grad,
            )
        layer.bias.sub_(shift.to(layer.bias.dtype))
        corrected.append(name)
    return corrected
