"""Output distortion of removing a group's least important units, measured data-free.

Xu et al. (ICCV 2023) allocate by the *output* distortion each layer's pruning causes alone,
summed over layers (their additivity, Eq. 5). Here the "layer" is a channel group and the input
is N(0, 1) noise of the model's input shape (slimline's datasets are standardised, so this matches
their first two moments; no training data is read).

Removing a unit is simulated by zeroing everything that produces it - the conv/linear rows and
biases, and the BN scale and shift - which makes the unit's output exactly zero, the same function
as physically removing it (for groups not normalised by a LayerNorm, where it is close). So one
forward pass per (group, level) suffices and the model is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from slimline.compress.prune.channel_groups import ChannelGraph, ChannelGroup

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@torch.no_grad()
def output_distortion_table(
    graph: ChannelGraph,
    scores: Sequence[torch.Tensor],
    levels: Sequence[np.ndarray],
    inputs: torch.Tensor,
    max_points: int = 12,
) -> np.ndarray:
    """``D[g, j]``: mean squared output change / mean squared output, group g alone at level j.

    Units are removed lowest score first. At most ``max_points`` levels per group are measured
    (always the smallest and the full one); the rest are interpolated linearly. Padding
    columns (groups with fewer levels) are ``+inf``, which :func:`allocate_dp` reads as forbidden.
    """
    model = graph.model
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        reference = _first(model(inputs)).double()
        scale = float(reference.pow(2).mean()) or 1.0
        table = np.full((len(levels), max(len(lv) for lv in levels)), np.inf)
        for g, (group, score, lv) in enumerate(zip(graph.groups, scores, levels)):
            order = torch.argsort(score, stable=True)
            measured = _sample(len(lv), max_points)
            values = []
            for j in measured:
                removed = order[: group.size - int(lv[j])]
                with _zeroed(graph, group, removed):
                    out = _first(model(inputs)).double()
                values.append(float((out - reference).pow(2).mean()) / scale)
            table[g, : len(lv)] = np.interp(np.arange(len(lv)), measured, values)
            table[g, len(lv) - 1] = 0.0
        return table
    finally:
        for module, training in modes:
            module.training = training


def _sample(count: int, max_points: int) -> list[int]:
    if count <= max_points:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, max_points)})


def _first(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first(output[0])
    if isinstance(output, dict):
        return _first(next(iter(output.values())))
    raise TypeError(f"model output {type(output).__name__} holds no tensor")


class _zeroed:  # noqa: N801 (used like a function: ``with _zeroed(...)``)
    """Zero the producers of ``units`` of ``group`` inside the block, then restore them."""

    def __init__(self, graph: ChannelGraph, group: ChannelGroup, units: torch.Tensor) -> None:
        self.saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        channels = set(group.units_to_channels(units)) if len(units) else set()
        tp_graph = graph.dependency_graph
        for item in group.tp_group:
            layer = item.dep.target.module
            if not isinstance(layer, _PRODUCERS):
                continue
            if not tp_graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            local = [i for i, r in zip(item.idxs, item.root_idxs) if r in channels]
            if not local:
                continue
            index = torch.tensor(local, dtype=torch.long)
            for tensor in (layer.weight, getattr(layer, "bias", None)):
                if tensor is None:
                    continue
                # A transposed conv keeps its output channels in dim 1 of the weight.
                dim = 1 if getattr(layer, "transposed", False) and tensor.dim() > 1 else 0
                self.saved.append((tensor, dim, index, tensor.index_select(dim, index).clone()))

    def __enter__(self) -> None:
        for tensor, dim, index, _ in self.saved:
            tensor.data.index_fill_(dim, index, 0.0)

    def __exit__(self, *exc: object) -> None:
        for tensor, dim, index, values in self.saved:
            tensor.data.index_copy_(dim, index, values)
