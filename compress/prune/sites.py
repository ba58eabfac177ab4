"""The data-free channel pruners behind ``prune.plain_channels`` and ``prune.neuron_merging``:
each prune site's smallest-norm channels removed (:func:`~slimline.compress.prune.neuron_merging.prune_sites`),
with nothing repaired (the baseline) or merged into their most similar kept channel (Kim et al.
2020). UDFC (:mod:`slimline.compress.quant.udfc`) prunes the same channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn

from slimline.compress.methods import (
    MethodConfig,
    MethodError,
    MethodInputs,
    PruneResult,
    register_pruner,
)
from slimline.params import check_range, param

__all__ = ["NeuronMergingConfig", "PlainChannelsConfig", "site_pruning_metrics"]


@dataclass
class PlainChannelsConfig(MethodConfig):
    """Remove the smallest-norm channels of each prune site, nothing repaired (the baseline)."""

    prune_ratio: float = param(0.3, help="fraction of each prune site's channels removed, [0, 1)")
    criterion: Literal["l1", "l2"] = param("l1", help="which channels: smallest filter L1/L2 norm")
    mean_correction: bool = param(
        False, help="restore the next layer's mean input from BN statistics (not in NM)"
    )

    def __post_init__(self) -> None:
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, high_open=True)


@dataclass
class NeuronMergingConfig(PlainChannelsConfig):
    """Neuron Merging (Kim et al. 2020): each pruned filter merged into its most similar kept
    one, data-free."""

    threshold: float = param(0.1, help="merge only into a kept filter at least this similar (cos)")
    lam: float = param(0.85, help="weight of cosine distance vs BN-bias distance when choosing")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("threshold", self.threshold, -1.0, 1.0)
        check_range("lam", self.lam, 0.0, 1.0)


def site_pruning_metrics(result: Any, model: nn.Module, before: int) -> dict[str, Any]:
    """Channel and parameter counts before and after a site pruning (also UDFC's)."""
    from slimline.compress.prune.structured import layer_widths

    total = sum(t.numel() for t in model.parameters())
    return {
        "channels_before": result.channels_before,
        "channels_after": result.channels_after,
        "sites": len(result.sites),
        "skipped": result.skipped,
        "params_before": before,
        "params_after": total,
        "params_ratio": total / before if before else 1.0,
        "layer_channels": layer_widths(model),
        "data_used": False,
    }


def no_site_error(skipped: dict[str, str]) -> MethodError:
    return MethodError(
        "the model has no prune site (a layer -> BN -> ReLU -> next layer chain whose channels "
        f"nothing else reads); not pruned: {skipped}"
    )


def _prune(model: nn.Module, config: PlainChannelsConfig, inputs: MethodInputs, *,
           compensation: Literal["merge", "none"], **merge: float) -> PruneResult:
    from slimline.compress.prune.channel_groups import StructuredPruningError
    from slimline.compress.prune.layer_chains import LayerChainError
    from slimline.compress.prune.neuron_merging import prune_sites

    before = sum(t.numel() for t in model.parameters())
    masks = dict(inputs.masks)
    try:
        result = prune_sites(model, inputs.require_example("site pruning"), config.prune_ratio,
                             criterion=config.criterion, compensation=compensation,
                             mean_correction=config.mean_correction, masks=masks, **merge)
    except (ValueError, LayerChainError, StructuredPruningError) as exc:
        raise MethodError(str(exc)) from None
    if config.prune_ratio > 0 and not result.sites:
        raise no_site_error(result.skipped)
    method = "neuron_merging" if compensation == "merge" else "plain_channels"
    record = {"method": method, "ratio": config.prune_ratio, "criterion": config.criterion,
              "mean_correction": config.mean_correction, **merge, "sites": result.sites}
    metrics = site_pruning_metrics(result, model, before)
    if compensation == "merge":
        metrics["merged"] = sum(s["merged"] for s in result.sites.values())
    return PruneResult(model, masks, record, metrics)


@register_pruner(PlainChannelsConfig)
def prune_plain_channels(model: nn.Module, config: PlainChannelsConfig,
                         inputs: MethodInputs) -> PruneResult:
    return _prune(model, config, inputs, compensation="none")


@register_pruner(NeuronMergingConfig)
def prune_neuron_merging(model: nn.Module, config: NeuronMergingConfig,
                         inputs: MethodInputs) -> PruneResult:
    return _prune(model, config, inputs, compensation="merge", threshold=config.threshold,
                  lam=config.lam)
