"""UDFC: unified data-free pruning and quantization, repaired in closed form in the next layer.

Bai, Chen, Shen, Qian & Liu, 2023, "Unified Data-Free Compression: Pruning and Quantization
without Fine-Tuning" (ICCV; arXiv 2308.07209), sec. 3. Layer ``l`` (Conv + BN with ``gamma,
beta, mu, sigma`` + ReLU) feeds layer ``l+1``. Write channel ``c``'s pre-activation as
``z_c = scale_c (W_c . x) + K_c`` with ``scale = gamma / sigma`` and ``K = beta - gamma mu /
sigma`` (:class:`~slimline.compress.prune.datafree_sites.ChannelFilters`).

**Pruning.** A pruned channel ``j`` is assumed to be a linear combination of the kept channels
``i``, ``a_j ~ sum_i s_i a_i``; layer ``l+1`` then reads the same input if its column ``i``
absorbs ``s_i`` times column ``j``. The scales minimise the reconstruction error of ``z_j``::

    L(s) = || sum_i s_i G_i - V ||^2 + alpha1 (sum_i s_i K_i - K_j)^2,
    G_i = (gamma_i sigma_j) / (sigma_i gamma_j) vec(W_i),   V = vec(W_j)

whose stationarity condition is the paper's closed form ``(G G^T + alpha1 k k^T) s = G V +
alpha1 K_j k``. That system is singular when there are more kept channels than filter entries,
so :func:`pruning_scales` solves the stacked least-squares problem ``[G^T; sqrt(alpha1) k^T] s
~ [V; sqrt(alpha1) K_j]`` (minimum-norm solution, SVD-based), after multiplying both rows by
``scale_j`` (same minimiser, and a channel with ``gamma_j = 0`` gets ``s = 0`` instead of a
division by zero).

**Quantization.** Kept channel ``m`` is quantized, ``R_m = scale_m vec(W_m)`` (its BN-folded
filter, which is what gets int8 levels) becoming ``R~_m``, and layer ``l+1``'s input channel
``m`` is multiplied by ``s~_m`` so that ``s~ z~_m`` matches ``z_m``::

    L(s~) = || R_m - s~ R~_m ||^2 + alpha2 ((1 - s~) K_m)^2
    s~_m = (R~_m . R_m + alpha2 K_m^2) / (R~_m . R~_m + alpha2 K_m^2)

(setting ``dL/ds~ = 0``: ``-R~.(R - s~ R~) - alpha2 K^2 (1 - s~) = 0``). The closed form
printed as the paper's eq. 21 is reported to reduce to 1, which is not this minimiser; we use
the derivation above, and tests/test_udfc.py checks it against a numerical minimum.

Both assumptions hold exactly only for a positively homogeneous activation: ``relu(s z) = s
relu(z)`` needs ``s >= 0``, so a combination with mixed-sign scales is an approximation after
the ReLU even when ``z_j`` is reconstructed exactly (it is exact when the channels involved are
always active, or when ``z_j`` is a positive multiple of one kept channel). ReLU6
(MobileNetV2) is homogeneous only below its clip at 6.

Both fits are least squares over an implicitly isotropic, zero-mean input, so both shrink
towards 0: when the kept filters explain little of ``R_j`` the scales ``s`` come out small
with mixed signs, and ``sum_i s_i E[a_i]`` no longer matches the pruned channel's mean output
``E[a_j] > 0``; likewise ``s~ < 1`` on average. bench/bench_udfc.py measures this (RESULTS.md:
on its small models ``s`` fitted to data activations keeps ~95% accuracy at 30% pruning, the
weight-space ``s`` does not). Two opt-in extensions restore that mean from BN statistics:
``mean_correction`` through the next layer's bias, ``mean_preserving`` inside ``s`` itself.

:func:`udfc_compress` runs it over a model in forward order; see its docstring for residual
blocks, depthwise convs and the layers that get no compensation.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from slimline.compress.prune.datafree_sites import (
    ChannelFilters,
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
from slimline.compress.quant.bn_statistics import clipped_normal_moments
from slimline.compress.quant.datafree import DataFreeResult, quantize_datafree, weight_spec
from slimline.compress.quant.fold import fold_conv_bn_weights
from slimline.compress.quant.target import Target, layer_weight_bits

__all__ = [
    "UDFCResult",
    "pruning_loss",
    "pruning_scales",
    "quantization_loss",
    "quantization_scales",
    "udfc_compress",
]


def pruning_loss(
    scales: torch.Tensor, filters: ChannelFilters, pruned: int, kept: torch.Tensor, alpha1: float
) -> torch.Tensor:
    """The UDFC pruning objective ``L(s)`` above for pruned channel ``pruned`` (float64)."""
    ratio = filters.scale[kept] / filters.scale[pruned]
    g = ratio[:, None] * filters.weight[kept]
    weight_term = (scales.double() @ g - filters.weight[pruned]).pow(2).sum()
    bias_term = (scales.double() @ filters.shift[kept] - filters.shift[pruned]) ** 2
    return weight_term + alpha1 * bias_term


def pruning_scales(
    filters: ChannelFilters,
    removed: torch.Tensor,
    alpha1: float,
    means: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form ``s`` (rows: ``removed`` channels; columns: kept channels, increasing index)
    minimising :func:`pruning_loss` for each removed channel.

    ``means`` (per channel ``E[a_c]`` after the activation; not in the paper): each row instead
    minimises the same loss subject to ``sum_i s_i means_i = means_j``, so the next layer keeps
    the pruned channel's mean input (equality-constrained least squares, solved on the null
    space of the constraint). Rows whose kept means are all zero stay unconstrained.
    """
    if alpha1 < 0:
        raise ValueError(f"alpha1 must be >= 0, got {alpha1}")
    channels = filters.weight.shape[0]
    if means is not None and means.shape != (channels,):
        raise ValueError(f"means must have one entry per channel ({channels}), got {means.shape}")
    keep = torch.ones(channels, dtype=torch.bool)
    keep[removed] = False
    kept = torch.nonzero(keep).flatten()
    folded = filters.scale[kept, None] * filters.weight[kept]  # R_i = scale_i W_i
    root = alpha1**0.5
    rows = []
    for j in removed.tolist():
        # (scale_j x) both residuals: sum_i s_i R_i - R_j and sqrt(a1) scale_j (s.k - K_j).
        matrix = torch.cat([folded.T, root * filters.scale[j] * filters.shift[kept][None]], 0)
        target = torch.cat(
            [
                filters.scale[j] * filters.weight[j],
                (root * filters.scale[j] * filters.shift[j]).reshape(1),
            ]
        )
        if means is None:
            rows.append(_least_squares(matrix, target))
        else:
            rows.append(_mean_constrained(matrix, target, means[kept].double(), means[j]))
    if not rows:
        return torch.zeros(0, len(kept), dtype=torch.float64)
    return torch.stack(rows)


def _least_squares(matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minimum-norm ``argmin ||matrix s - target||`` (SVD-based: rank-deficient is fine)."""
    if matrix.shape[1] == 0:
        return matrix.new_zeros(0)
    return torch.linalg.lstsq(matrix, target[:, None], driver="gelsd").solution[:, 0]


def _mean_constrained(
    matrix: torch.Tensor, target: torch.Tensor, kept_means: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """``argmin ||matrix s - target||`` subject to ``kept_means . s = mean``: ``s = s0 + N t``
    with ``s0`` the smallest feasible point and ``N`` an orthonormal basis of the constraint's
    null space (the trailing columns of a complete QR of ``kept_means``)."""
    norm2 = kept_means.dot(kept_means)
    if norm2 == 0:
        return _least_squares(matrix, target)
    base = kept_means * (mean / norm2)
    basis = torch.linalg.qr(kept_means[:, None], mode="complete").Q[:, 1:]
    free = _least_squares(matrix @ basis, target - matrix @ base)
    return base + basis @ free


def quantization_loss(
    scale: torch.Tensor | float,
    folded: torch.Tensor,
    quantized: torch.Tensor,
    shift: torch.Tensor | float,
    alpha2: float,
) -> torch.Tensor:
    """The UDFC quantization objective ``L(s~)`` above for one channel (float64)."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    shift = torch.as_tensor(shift, dtype=torch.float64)
    error = (folded.double() - scale * quantized.double()).pow(2).sum()
    return error + alpha2 * ((1 - scale) * shift) ** 2


def quantization_scales(
    folded: torch.Tensor, quantized: torch.Tensor, shift: torch.Tensor, alpha2: float
) -> torch.Tensor:
    """``s~_m = (R~_m . R_m + alpha2 K_m^2) / (R~_m . R~_m + alpha2 K_m^2)`` per output channel
    (rows of ``folded``/``quantized``); 1 where the denominator vanishes."""
    if alpha2 < 0:
        raise ValueError(f"alpha2 must be >= 0, got {alpha2}")
    r = folded.double().flatten(1)
    q = quantized.double().flatten(1)
    k2 = alpha2 * shift.double() ** 2
    numerator = (q * r).sum(1) + k2
    denominator = (q * q).sum(1) + k2
    ok = denominator > 0
    return torch.where(
        ok,
        numerator / torch.where(ok, denominator, torch.ones_like(denominator)),
        torch.ones_like(denominator),
    )


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
