"""Prune sites for data-free channel pruning with compensation in the next layer.

A :class:`PruneSite` is a set of channels that can be removed with the damage repaired by one
consumer layer (UDFC, Neuron Merging) or not repaired at all (the plain baseline):

* ``direct``: a :class:`~slimline.compress.prune.layer_chains.LayerChain` ``layer -> BN -> ReLU ->
  consumer`` with a dense Conv or Linear consumer. In a ResNet BasicBlock that is ``conv1 ->
  bn1 -> relu1 -> conv2``; the block's output channels (tied to the residual add) are no site.
* ``depthwise``: ``expand -> BN -> act -> depthwise -> BN -> act -> consumer`` (a MobileNetV2
  inverted residual). A depthwise conv ties its output channel ``c`` to its input channel
  ``c``, so it cannot absorb a pruned channel into the others: pruning hidden channel ``c``
  removes it from the expand conv, both BNs and the depthwise conv, and the *project* conv
  absorbs it. For the linear-combination model each hidden channel's filter is the composed
  map ``depthwise o BN o expand`` (an outer product of the 3x3 depthwise kernel and the 1x1
  expand filter), with the middle activation taken as identity: exact where that ReLU6 is in
  its linear range (0, 6), an approximation otherwise. The expand conv must be 1x1, stride 1.

Every site is checked against Torch-Pruning's dependency graph (the same surgery
``prune.channels`` uses): its coupled group must contain exactly the site's layers, so no
residual add or concatenation silently shares the channels. The channels are then removed with
that group's surgery, physically (``slimline.structure`` records the new shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from slimline.compress.prune.channel_groups import (
    ChannelGraph,
    ChannelGroup,
    StructuredPruningError,
    find_channel_groups,
)
from slimline.compress.prune.channel_surgery import prune_group
from slimline.compress.prune.layer_chains import LayerChain, find_layer_chains

__all__ = [
    "ChannelFilters",
    "compensate_mean",
    "PruneSite",
    "SiteSearch",
    "SiteTotals",
    "absorb_channels",
    "channel_filters",
    "find_prune_sites",
    "remove_site_channels",
    "select_channels",
    "site_record",
]

Criterion = Literal["l1", "l2"]


@dataclass
class PruneSite:
    """Channels removable together and repaired by ``consumer`` (see the module docstring)."""

    kind: Literal["direct", "depthwise"]
    chains: tuple[LayerChain, ...]  # one (direct) or two (expand, depthwise)
    group: ChannelGroup | None = None

    @property
    def name(self) -> str:
        """The first layer producing the channels (what forward order sorts by)."""
        return self.chains[0].layer

    @property
    def consumer(self) -> str:
        return self.chains[-1].consumer

    @property
    def consumer_kind(self) -> str:
        return self.chains[-1].consumer_kind

    def modules(self) -> set[str]:
        names = {self.consumer}
        for chain in self.chains:
            names.add(chain.layer)
            if chain.norm:
                names.add(chain.norm)
        return names


@dataclass
class SiteSearch:
    """Sites in forward order, the Torch-Pruning graph that prunes them, and what was left out."""

    sites: list[PruneSite]
    graph: ChannelGraph | None
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it is not a site


@dataclass
class ChannelFilters:
    """Each output channel ``c`` of a site as ``z_c = scale_c * (weight_c . x) + shift_c``.

    ``weight`` (C, D) holds the filters before the BatchNorm (the layer's weights, or the
    composed depthwise o expand kernel), ``scale`` = gamma / sigma and ``shift`` = beta -
    gamma * (mu - b) / sigma (with the conv bias b) are the BatchNorm's affine map, so
    ``scale * weight`` is the BN-folded filter and ``shift`` the folded bias. ``selection``
    (C, D') is what the L1/L2 criterion ranks.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    selection: torch.Tensor


def find_prune_sites(model: nn.Module, example_input: Any) -> SiteSearch:
    """Every prune site of ``model`` (in forward order) with its verified coupled group.

    Raises:
        LayerChainError: fx cannot trace the model.
        StructuredPruningError: Torch-Pruning cannot trace it.
    """
    chains = find_layer_chains(model)
    modules = dict(model.named_modules())
    candidates: list[PruneSite] = []
    skipped: dict[str, str] = {}
    depthwise_layers = {c.consumer for c in chains.values() if c.consumer_kind == "depthwise"}
    for chain in chains.values():
        if chain.layer in depthwise_layers:
            continue  # part of its expand conv's depthwise site
        if chain.consumer_kind != "depthwise":
            if _is_depthwise_layer(modules[chain.layer]):
                skipped[chain.layer] = (
                    "depthwise conv whose input channels are not a chain "
                    "(they are tied to what feeds it)"
                )
                continue
            candidates.append(PruneSite("direct", (chain,)))
            continue
        second = chains.get(chain.consumer)
        if second is None or second.consumer_kind == "depthwise":
            skipped[chain.layer] = (
                f"its depthwise consumer {chain.consumer!r} does not feed "
                "one dense layer through BN + activation"
            )
            continue
        expand = modules[chain.layer]
        if not (
            isinstance(expand, nn.modules.conv._ConvNd)
            and all(k == 1 for k in expand.kernel_size)
            and all(s == 1 for s in expand.stride)
        ):
            skipped[chain.layer] = "a depthwise site needs a 1x1, stride-1 expand conv"
            continue
        candidates.append(PruneSite("depthwise", (chain, second)))
    if not candidates:
        return SiteSearch([], None, skipped)
    graph = find_channel_groups(model, example_input)
    sites = []
    for site in candidates:
        group = _matching_group(graph, site, modules)
        if group is None:
            skipped[site.name] = (
                "its channels are coupled to more layers than "
                f"{sorted(site.modules())} (residual add, concat, ...)"
            )
            continue
        site.group = group
        sites.append(site)
    return SiteSearch(sites, graph, skipped)


def _is_depthwise_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1


def _matching_group(
    graph: ChannelGraph, site: PruneSite, modules: dict[str, nn.Module]
) -> ChannelGroup | None:
    wanted = site.modules()
    for group in graph.groups:
        members = {n for n in group.out_layers + group.in_layers if n in modules}
        if group.kind == "channels" and members == wanted:
            return group
    return None


@torch.no_grad()
def channel_filters(model: nn.Module, site: PruneSite) -> ChannelFilters:
    """The site's channels as filters + BN affine map (float64; see :class:`ChannelFilters`)."""
    first = site.chains[0]
    layer = model.get_submodule(first.layer)
    weight = layer.weight.detach().double().flatten(1)
    scale, shift = _affine(model, first, layer)
    if site.kind == "direct":
        return ChannelFilters(weight, scale, shift, weight)
    # Depthwise: hidden channel c is dw_c * (scale_c * expand_c . x + shift_c); as a filter on
    # the block input that is the outer product expand_c (Cin) x dw_c (k*k), scaled by scale_c.
    second = site.chains[1]
    depthwise = model.get_submodule(second.layer)
    kernel = depthwise.weight.detach().double().flatten(1)  # (C, k*k)
    composed = (scale[:, None, None] * weight[:, :, None] * kernel[:, None, :]).flatten(1)
    dw_bias = (
        depthwise.bias.detach().double() if depthwise.bias is not None else torch.zeros_like(scale)
    )
    # A constant input shift_c reaches the depthwise output as shift_c * sum(kernel_c)
    # (interior pixels; zero padding makes borders differ).
    composed_bias = shift * kernel.sum(1) + dw_bias
    scale2, shift2 = _affine(model, second, depthwise, bias=composed_bias)
    return ChannelFilters(composed, scale2, shift2, composed)


def _affine(
    model: nn.Module, chain: LayerChain, layer: nn.Module, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma / sigma, beta - gamma (mu - b) / sigma) of the chain's BN (1 and b without BN)."""
    channels = layer.weight.shape[0]
    if bias is None:
        bias = (
            layer.bias.detach().double()
            if layer.bias is not None
            else torch.zeros(channels, dtype=torch.float64)
        )
    if chain.norm is None:
        return torch.ones(channels, dtype=torch.float64), bias
    norm = model.get_submodule(chain.norm)
    sigma = torch.sqrt(norm.running_var.double() + norm.eps)
    gamma = norm.weight.detach().double() if norm.weight is not None else torch.ones_like(sigma)
    beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(sigma)
    scale = gamma / sigma
    return scale, beta - scale * (norm.running_mean.double() - bias)


def select_channels(
    filters: ChannelFilters, ratio: float, criterion: Criterion, name: str = ""
) -> torch.Tensor:
    """Indices (sorted) of the ``round(ratio * C)`` channels with the smallest filter norm.

    At least one channel is always kept. Ties keep the lower index (stable sort).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name or 'site'}: prune ratio must be in [0, 1), got {ratio}")
    if criterion not in ("l1", "l2"):
        raise ValueError(f"criterion must be 'l1' or 'l2', got {criterion!r}")
    channels = filters.selection.shape[0]
    count = min(int(round(ratio * channels)), channels - 1)
    norms = filters.selection.abs().sum(1) if criterion == "l1" else filters.selection.norm(dim=1)
    return torch.sort(torch.argsort(norms, stable=True)[:count]).values


@torch.no_grad()
def absorb_channels(
    model: nn.Module, site: PruneSite, removed: torch.Tensor, scales: torch.Tensor
) -> None:
    """Consumer input channel ``k`` += sum_j ``scales[j, k]`` x input channel ``removed[j]``.

    ``scales`` is (len(removed), kept) with the kept channels in increasing index order: the
    consumer then reads ``a_k + ...`` as if ``a_j = sum_k scales[j, k] a_k`` were still there.
    """
    consumer = model.get_submodule(site.consumer)
    weight = consumer.weight
    channels = weight.shape[1]
    kept = _kept(channels, removed)
    if scales.shape != (len(removed), len(kept)):
        raise ValueError(
            f"{site.name}: scales must be ({len(removed)}, {len(kept)}), got {tuple(scales.shape)}"
        )
    columns = (
        weight.detach().double().flatten(2)
        if weight.ndim > 2
        else (weight.detach().double().unsqueeze(2))
    )
    added = torch.einsum("jk,ojr->okr", scales.double(), columns[:, removed])
    columns[:, kept] += added
    weight.copy_(columns.reshape(weight.shape).to(weight.dtype))


@torch.no_grad()
def compensate_mean(
    model: nn.Module, site: PruneSite, removed: torch.Tensor, scales: torch.Tensor
) -> bool:
    """Consumer bias += ``sum_j W[:, j] (E[a_j] - sum_k scales[j, k] E[a_k])`` (summed over the
    kernel): what the repaired consumer still misses *on average*, with the activation means
    ``E[a]`` of the clipped normal ``N(beta, gamma^2)`` the site's last BatchNorm remembers.

    Not part of UDFC or Neuron Merging (an extension in the spirit of DFQ's bias correction,
    off by default). Zero padding makes the consumer's border outputs differ slightly. Returns
    False (nothing done) for a site without a BatchNorm. Call before removing the channels.
    """
    from slimline.compress.quant.bn_statistics import clipped_normal_moments
    from slimline.compress.quant.fold import conv_bn_pairs

    chain = site.chains[-1]
    if chain.norm is None or len(removed) == 0:
        return False
    norm = model.get_submodule(chain.norm)
    high = 6.0 if chain.activation_kind == "relu6" else math.inf
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros(norm.num_features)
    gamma = norm.weight.detach() if norm.weight is not None else torch.ones(norm.num_features)
    mean, _ = clipped_normal_moments(beta, gamma, 0.0, high)
    kept = _kept(len(mean), removed)
    missing = mean[removed] - scales.double() @ mean[kept]
    consumer = model.get_submodule(site.consumer)
    weight = consumer.weight.detach().double()[:, removed]
    added = (weight.flatten(2).sum(2) if weight.ndim > 2 else weight) @ missing
    following = dict(conv_bn_pairs(model)).get(site.consumer)
    if following is not None:  # BN(y + b) is BN(y) with running_mean - b: no new bias tensor
        norm = model.get_submodule(following)
        norm.running_mean.sub_(added.to(norm.running_mean.dtype))
        return True
    if consumer.bias is None:
        consumer.bias = nn.Parameter(
            torch.zeros(weight.shape[0], dtype=consumer.weight.dtype),
            requires_grad=consumer.weight.requires_grad,
        )
    consumer.bias.add_(added.to(consumer.bias.dtype))
    return True


def _kept(channels: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(channels, dtype=torch.bool)
    keep[removed] = False
    return torch.nonzero(keep).flatten()


def remove_site_channels(
    search: SiteSearch,
    site: PruneSite,
    removed: torch.Tensor,
    masks: dict[str, torch.Tensor] | None = None,
) -> None:
    """Physically remove ``removed`` channels of the site (Torch-Pruning group surgery);
    keep-masks of the affected weights are sliced along."""
    if len(removed) == 0:
        return
    if site.group is None or search.graph is None:
        raise StructuredPruningError(f"site {site.name!r} has no verified channel group")
    try:
        prune_group(search.graph, site.group, removed, masks)
    except StructuredPruningError:
        raise
    except Exception as exc:  # torch-pruning surgery failed: say where
        raise StructuredPruningError(
            f"torch-pruning failed to remove channels of site "
            f"{site.name!r} (layers {sorted(site.modules())}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def site_record(site: PruneSite, filters: ChannelFilters, removed: torch.Tensor) -> dict[str, Any]:
    """The per-site entry of a pruning result: kind, consumer, channels before/after and the
    removed channel indices (callers add their method's own keys)."""
    return {
        "kind": site.kind,
        "consumer": site.consumer,
        "before": len(filters.scale),
        "after": len(filters.scale) - len(removed),
        "removed": removed.tolist(),
    }


class SiteTotals:
    """Channel totals for a result dataclass whose ``sites`` maps site names to
    :func:`site_record` entries."""

    @property
    def channels_before(self) -> int:
        return sum(s["before"] for s in self.sites.values())

    @property
    def channels_after(self) -> int:
        return sum(s["after"] for s in self.sites.values())
