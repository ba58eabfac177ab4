"""Surgery: physically remove the chosen units of a channel group (and every layer coupled to it)
with Torch-Pruning, slicing keep-masks along and updating head counts of attention modules.
The groups come from :mod:`slimline.compress.prune.channel_groups`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimline.compress.prune.channel_groups import (
    CONV_LINEAR,
    HEAD_COUNT_ATTRS,
    INNER_DIM_ATTRS,
    ChannelGraph,
    ChannelGroup,
    StructuredPruningError,
)

__all__ = ["prune_group"]


@torch.no_grad()
def prune_group(
    graph: ChannelGraph,
    group: ChannelGroup,
    remove_units: torch.Tensor,
    masks: dict[str, torch.Tensor] | None = None,
) -> None:
    """Physically remove ``remove_units`` of ``group`` (and every coupled layer), in place.

    ``masks`` (parameter name -> keep-mask) are sliced along with the weights they mask.
    """
    if len(remove_units) == 0:
        return
    if len(remove_units) >= group.size:
        raise StructuredPruningError(f"group {group.name!r}: cannot remove all {group.size} units")
    idxs = group.units_to_channels(remove_units)
    tp_graph = graph.dependency_graph
    pruning_group = tp_graph.get_pruning_group(group.root, group.root_fn, idxs)
    if not tp_graph.check_pruning_group(pruning_group):
        raise StructuredPruningError(
            f"group {group.name!r}: removing {len(idxs)} channels would empty a coupled layer"
        )
    if masks:
        _slice_masks(pruning_group, tp_graph, graph.layer_names, masks)
    pruning_group.prune()
    if group.kind == "heads":
        attention = graph.model.get_submodule(group.attention or "")
        kept = group.size - len(remove_units)
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, kept)
        for attr in INNER_DIM_ATTRS:
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, kept * group.unit_width)
        group.size = kept
    else:
        group.size -= len(remove_units)


def _slice_masks(
    pruning_group: Any, tp_graph: Any, names: dict[nn.Module, str], masks: dict[str, torch.Tensor]
) -> None:
    """Apply the group's index removal to keep-masks of Conv/Linear weights."""
    for dep, idxs in pruning_group:
        module = dep.target.module
        if not isinstance(module, CONV_LINEAR) or names.get(module) is None:
            continue
        key = f"{names[module]}.weight" if names[module] else "weight"
        if key not in masks:
            continue
        mask = masks[key]
        depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
        transposed = getattr(module, "transposed", False)
        if tp_graph.is_out_channel_pruning_fn(dep.handler) or depthwise:
            dim = 1 if transposed else 0
        else:
            dim = 0 if transposed else 1
        removed = set(idxs)
        keep = [i for i in range(mask.shape[dim]) if i not in removed]
        masks[key] = mask.index_select(dim, torch.tensor(keep, dtype=torch.long))
