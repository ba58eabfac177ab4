"""UDFC: unified data-free pruning and quantization, repaired in closed form in the next layer.

Bai, Chen, Shen, Qian & Liu, 2023, "Unified Data-Free Compression: Pruning and Quantization
without Fine-Tuning" (ICCV; arXiv 2308.07209), sec. 3. Layer ``l`` (Conv + BN with ``gamma,
beta, mu, sigma`` + ReLU) feeds layer ``l+1``. Write channel ``c``'s pre-activation as
``z_c = scale_c (W_c . x) + K_c`` with ``scale = gamma / sigma`` and ``K = beta - gamma mu /
sigma`` (:class:`~slimline.compress.prune.datafree_sites.ChannelFilters`).

The closed forms (both repairs, with the equations they implement) are in
:mod:`slimline.compress.quant.udfc_scales`. :func:`udfc_compress` runs it over a model in forward order; see its docstring for residual
blocks, depthwise convs and the layers that get no compensation.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from slimline.compress.methods import (
    MethodError,
    MethodInputs,
    QuantizeResult,
    register_quantizer,
)
from slimline.compress.prune.datafree_sites import (
    PruneSite,
    SiteTotals,
    absorb_channels,
    channel_filters,
    compensate_mean,
    find_prune_sites,
    remove_site_channels,
    site_record,
)
from slimline.compress.prune.layer_chains import LayerChain, find_layer_chains, forward_layer_order
from slimline.compress.prune.neuron_merging import select_site_channels
from slimline.compress.quant.bn_statistics import DataFreeRangeError, clipped_normal_moments
from slimline.compress.quant.datafree import (
    DataFreeConfig,
    DataFreeResult,
    datafree_kwargs,
    datafree_metrics,
    quantize_datafree,
    weight_spec,
)
from slimline.compress.quant.fold import fold_conv_bn_weights
from slimline.compress.quant.target import Target, layer_weight_bits
from slimline.compress.quant.udfc_scales import pruning_scales, quantization_scales
from slimline.params import ParamError, check_range, param

log = logging.getLogger(__name__)

__all__ = [
    "UDFCResult",
    "UDFCConfig",
    "udfc_compress",
]


@dataclass
class UDFCResult(SiteTotals):
    """What :func:`udfc_compress` did; ``quant`` is ``None`` when it only pruned."""

    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> channels, scales
    compensated: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> s~ stats
    skipped: dict[str, str] = field(default_factory=dict)
    quant: DataFreeResult | None = None
    seconds: float = 0.0


@torch.no_grad()
def udfc_compress(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    prune_ratio: float = 0.3,
    weight_bits: int | None = 6,
    criterion: Literal["l1", "l2"] = "l1",
    alpha1: float = 0.01,
    alpha2: float = 0.008,
    compensate_quantization: bool = True,
    per_channel: bool = True,
    symmetric_weights: bool = True,
    range_sigmas: float = 6.0,
    activation_signed: bool = False,
    symmetric_activations: bool = False,
    input_std: float = 1.0,
    mean_correction: bool = False,
    mean_preserving: bool = False,
    skip: str | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    target: Target | str | None = "auto",
) -> UDFCResult:
    """Prune ``prune_ratio`` of every site's channels and quantize to ``weight_bits``, in place,
    repairing both in the next layer (module docstring). ``weight_bits=None``: prune only
    (float model, BatchNorms kept); otherwise the model ends BN-folded with the
    :class:`~slimline.compress.quant.state.QuantState` of :func:`quantize_datafree` attached
    (activation ranges from BN statistics, 8 bits). ``masks`` (keep-masks by parameter name)
    are sliced along with the weights. ``mean_correction`` (off: not in the paper) also
    restores each consumer's mean input from BN statistics
    (:func:`~slimline.compress.prune.datafree_sites.compensate_mean`). ``mean_preserving`` (off: not in
    the paper) constrains each ``s`` row to keep the pruned channel's mean output, the BN
    statistics' clipped-normal ``E[a]`` (:func:`pruning_scales` with ``means``).

    Decisions the paper leaves open:

    * **Which channels.** Only :class:`~slimline.compress.prune.datafree_sites.PruneSite` channels: read
      by exactly one next layer. In a ResNet that is each BasicBlock's ``conv1`` (absorbed by
      ``conv2``); channels tied to a residual add have several readers and stay.
    * **Depthwise.** A MobileNetV2 block prunes its hidden channels from the expand conv and the
      depthwise conv together; the project conv absorbs them (the filter is the composed
      expand + depthwise kernel). For quantization a depthwise conv *can* absorb ``s~``: its
      channel ``m`` reads only input channel ``m``.
    * **Which of them.** Each site's ``prune_ratio`` smallest-norm filters, ranked on the model
      as given before any repair (:func:`~slimline.compress.prune.neuron_merging.select_site_channels`),
      so plain pruning, Neuron Merging and UDFC remove the same channels.
    * **Order.** Layers are processed in forward order, each one after its input side was
      repaired, pruning before quantizing: ``W_{l+1}[:, i] = s~_i (W_{l+1}[:, i] + sum_j s_ji
      W_{l+1}[:, j])``.
    * **No next layer.** Layers whose output feeds a residual add or the model output (the
      stem, a block's last conv, projections, the classifier) are quantized by plain RTN.

    ``target`` (the CPU the int8 file is for) can lower a layer's bit width to the range its
    kernels compute exactly; the repair ``s~`` is solved for that same grid.
    """
    if weight_bits is not None and not 2 <= weight_bits <= 16:
        raise ValueError(f"weight_bits must be in [2, 16] (or None: prune only), got {weight_bits}")
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    started = time.perf_counter()
    model.eval()
    result = UDFCResult()
    sites_by_layer = {}
    removed_by_site: dict[str, torch.Tensor] = {}
    if prune_ratio > 0:
        search = find_prune_sites(model, example_input)
        result.skipped.update(search.skipped)
        sites_by_layer = {site.name: site for site in search.sites}
        removed_by_site = select_site_channels(model, search.sites, prune_ratio, criterion)
    chains = find_layer_chains(model) if weight_bits is not None else {}
    for name in forward_layer_order(model):
        site = sites_by_layer.get(name)
        if site is not None:
            filters = channel_filters(model, site)
            removed = removed_by_site[name]
            means = _activation_means(model, site) if mean_preserving else None
            scales = pruning_scales(filters, removed, alpha1, means)
            absorb_channels(model, site, removed, scales)
            if mean_correction:
                compensate_mean(model, site, removed, scales)
            remove_site_channels(search, site, removed, masks)
            result.sites[site.name] = {
                **site_record(site, filters, removed),
                "max_abs_scale": float(scales.abs().max()) if scales.numel() else 0.0,
            }
        chain = chains.get(name)
        if (
            chain is not None
            and compensate_quantization
            and weight_bits is not None
            and not (skip and re.search(skip, name))
        ):
            grid = "symmetric" if symmetric_weights else "affine"
            bits = layer_weight_bits(model.get_submodule(name), weight_bits, target, grid=grid)
            result.compensated[name] = _compensate_quantization(
                model, chain, bits, alpha2, per_channel, symmetric_weights
            )
    if weight_bits is not None:
        result.quant = quantize_datafree(
            model,
            weight_bits=weight_bits,
            per_channel=per_channel,
            symmetric_weights=symmetric_weights,
            range_sigmas=range_sigmas,
            activation_signed=activation_signed,
            symmetric_activations=symmetric_activations,
            input_std=input_std,
            skip=skip,
            target=target,
            method="udfc",
            info={
                "prune_ratio": prune_ratio,
                "criterion": criterion,
                "alpha1": alpha1,
                "alpha2": alpha2,
                "compensate_quantization": compensate_quantization,
                "mean_correction": mean_correction,
                "mean_preserving": mean_preserving,
            },
        )
    result.seconds = time.perf_counter() - started
    return result


def _activation_means(model: nn.Module, site: PruneSite) -> torch.Tensor:
    """``E[a_c]`` per channel of the site's output: ``act(N(beta, gamma^2))`` of its last
    BatchNorm (clipped at 0, and at 6 for ReLU6); zeros without a BatchNorm (no constraint)."""
    chain = site.chains[-1]
    channels = model.get_submodule(chain.layer).weight.shape[0]
    if chain.norm is None:
        return torch.zeros(channels, dtype=torch.float64)
    norm = model.get_submodule(chain.norm)
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros(channels)
    gamma = norm.weight.detach() if norm.weight is not None else torch.ones(channels)
    high = 6.0 if chain.activation_kind == "relu6" else math.inf
    return clipped_normal_moments(beta, gamma, 0.0, high)[0]


def _compensate_quantization(
    model: nn.Module,
    chain: LayerChain,
    bits: int,
    alpha2: float,
    per_channel: bool,
    symmetric: bool,
) -> dict[str, float]:
    """Scale the consumer's input channels by ``s~`` for the grid :func:`quantize_datafree`
    will give this layer (the same BN folding, the same weight spec, so the same ``R~``)."""
    layer = model.get_submodule(chain.layer)
    if chain.norm is not None:
        norm = model.get_submodule(chain.norm)
        folded, shift = fold_conv_bn_weights(
            layer.weight,
            layer.bias,
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            norm.eps,
        )
    else:
        folded = layer.weight.detach()
        shift = layer.bias.detach() if layer.bias is not None else torch.zeros(folded.shape[0])
    quantized = weight_spec(folded, bits, per_channel=per_channel, symmetric=symmetric).fake_quant(
        folded
    )
    scales = quantization_scales(folded, quantized, shift, alpha2)
    consumer = model.get_submodule(chain.consumer)
    weight = consumer.weight
    shape = [1] * weight.ndim
    shape[0 if chain.consumer_kind == "depthwise" else 1] = -1
    weight.mul_(scales.to(weight.dtype).reshape(shape))
    return {"min": float(scales.min()), "max": float(scales.max()), "mean": float(scales.mean())}


# ---- the method behind slimline.quantize / the compress.udfc stage ------------------------


@dataclass
class UDFCConfig(DataFreeConfig):
    """UDFC (Bai et al. 2023): joint channel pruning + low-bit weights, both repaired in the
    next layer in closed form; no data."""

    prune_ratio: float = param(0.3, help="fraction of each prune site's channels removed, [0, 1)")
    weight_bits: int = param(6, help="weight bits, 2-8 (below 8: low-bit levels on the int8 grid)")
    criterion: Literal["l1", "l2"] = param("l1", help="which channels: smallest filter L1/L2 norm")
    alpha1: float = param(0.01, help="weight of the BN-bias term in the pruning reconstruction")
    alpha2: float = param(0.008, help="weight of the BN-bias term in the quantization scale")
    activation_bits: int = param(8, help="activation bits (8: what int8 kernels run)")
    compensate_quantization: bool = param(
        True, help="scale the next layer by s~ for each quantized channel (UDFC's second half)"
    )
    mean_correction: bool = param(
        False, help="also restore the next layer's mean input from BN statistics (not in the paper)"
    )
    mean_preserving: bool = param(
        False,
        help="constrain the pruning scales to keep each pruned channel's BN-predicted mean output "
        "(not in the paper)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, high_open=True)
        if self.alpha1 < 0 or self.alpha2 < 0:
            raise ParamError("alpha1" if self.alpha1 < 0 else "alpha2", "must be >= 0")
        if self.activation_bits != 8:
            raise ParamError(
                "activation_bits",
                f"only 8-bit activations are supported (int8 kernels), got {self.activation_bits}",
            )


@register_quantizer(UDFCConfig)
def udfc_method(model: nn.Module, config: UDFCConfig, inputs: MethodInputs) -> QuantizeResult:
    from slimline.compress.prune.channel_groups import StructuredPruningError
    from slimline.compress.prune.layer_chains import LayerChainError
    from slimline.compress.prune.sites import no_site_error, site_pruning_metrics
    from slimline.compress.quant.datafree import require_batchnorm
    from slimline.compress.quant.rtn import refuse_quantized

    p = config
    refuse_quantized(model)
    require_batchnorm(model, "compress.udfc")
    before = sum(t.numel() for t in model.parameters())
    masks = dict(inputs.masks)
    try:
        result = udfc_compress(
            model,
            inputs.require_example("compress.udfc"),
            prune_ratio=p.prune_ratio,
            criterion=p.criterion,
            alpha1=p.alpha1,
            alpha2=p.alpha2,
            compensate_quantization=p.compensate_quantization,
            mean_correction=p.mean_correction,
            mean_preserving=p.mean_preserving,
            masks=masks,
            **datafree_kwargs(p, inputs.target),
        )
    except (ValueError, LayerChainError, StructuredPruningError, DataFreeRangeError) as exc:
        raise MethodError(str(exc)) from None
    if p.prune_ratio > 0 and not result.sites:
        raise no_site_error(result.skipped)
    assert result.quant is not None  # weight_bits is always set here
    pruning = {
        "method": "udfc",
        "ratio": p.prune_ratio,
        "criterion": p.criterion,
        "alpha1": p.alpha1,
        "mean_correction": p.mean_correction,
        "mean_preserving": p.mean_preserving,
        "sites": result.sites,
    }
    metrics = {
        **site_pruning_metrics(result, model, before),
        **datafree_metrics(result.quant, p, "udfc"),
        "udfc_seconds": result.seconds,
        "alpha1": p.alpha1,
        "alpha2": p.alpha2,
        "compensated_layers": len(result.compensated),
        "quantization_scales": result.compensated,
    }
    log.info("%d -> %d site channels, %d layers rescaled, %.2fs", result.channels_before,
             result.channels_after, len(result.compensated), result.seconds)
    return QuantizeResult(model, result.quant.state, metrics, masks=masks, pruning=pruning)
