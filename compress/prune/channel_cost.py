"""What a channel allocation costs: the :class:`CostModel` that predicts a model's channels,
FLOPs or (with a per-layer table) onnxruntime latency exactly from the kept count of each group,
so allocators (:mod:`slimline.compress.prune.channel_allocation`) can compare choices without
pruning anything. See that module for how the budgets are defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch.nn as nn

from slimline.compress.prune.channel_groups import (
    CONV_LINEAR,
    ChannelGraph,
    StructuredPruningError,
)
from slimline.compress.prune.flops import FlopCount

if TYPE_CHECKING:
    from slimline.export.layer_lut import LayerLatencyTable

__all__ = ["CostModel", "build_cost_model"]


@dataclass
class _LayerCost:
    flops: float
    out_total: int
    in_total: int
    out_parts: list[tuple[int, int]] = field(default_factory=list)  # (group index, channels)
    in_parts: list[tuple[int, int]] = field(default_factory=list)
    name: str = ""


@dataclass
class CostModel:
    """Predicts channels, FLOPs and (with a table attached) latency for any kept counts."""

    sizes: list[int]
    widths: list[int]
    total_flops: float
    constant: float
    layers: list[_LayerCost]
    head_flops: dict[int, float]
    latency_table: LayerLatencyTable | None = None
    latency_constant: float = 0.0  # overhead + layers no group touches (ms)

    def layer_widths(self, kept: Sequence[int]) -> dict[str, tuple[int, int]]:
        """``{layer: (in, out)}`` channels of every layer some group touches, at ``kept``."""
        fraction = [k / n for k, n in zip(kept, self.sizes)]
        return {
            layer.name: (
                round(layer.in_total * _kept_fraction(layer.in_total, layer.in_parts, fraction)),
                round(layer.out_total * _kept_fraction(layer.out_total, layer.out_parts, fraction)),
            )
            for layer in self.layers
        }

    def latency(self, kept: Sequence[int]) -> float:
        """Predicted latency (ms) from the attached table; see :func:`attach_latency`."""
        table = self._table()
        widths = self.layer_widths(kept)
        return self.latency_constant + sum(table.lookup(n, i, o) for n, (i, o) in widths.items())

    def group_latency(self, g: int, kept: Sequence[int], levels: np.ndarray) -> np.ndarray:
        """Latency of the layers group ``g`` touches, for each of ``levels``, others at ``kept``."""
        table = self._table()
        fraction = [k / n for k, n in zip(kept, self.sizes)]
        result = np.zeros(len(levels))
        for layer in self.layers:
            out_g = sum(c for h, c in layer.out_parts if h == g)
            in_g = sum(c for h, c in layer.in_parts if h == g)
            if not out_g and not in_g:
                continue
            f = np.asarray(levels, dtype=np.float64) / self.sizes[g]
            out_rest = _kept_fraction(layer.out_total, layer.out_parts, fraction, skip=g)
            in_rest = _kept_fraction(layer.in_total, layer.in_parts, fraction, skip=g)
            outs = np.round(layer.out_total * out_rest + out_g * f)
            ins = np.round(layer.in_total * in_rest + in_g * f)
            result += [table.lookup(layer.name, i, o) for i, o in zip(ins, outs)]
        return result

    def _table(self) -> LayerLatencyTable:
        if self.latency_table is None:
            raise StructuredPruningError(
                "no latency table attached (see layer_latency.attach_latency)"
            )
        return self.latency_table

    def channels(self, kept: Sequence[int]) -> int:
        return int(sum(k * w for k, w in zip(kept, self.widths)))

    def flops(self, kept: Sequence[int]) -> float:
        fraction = [k / n for k, n in zip(kept, self.sizes)]
        total = self.constant + sum(a * fraction[g] for g, a in self.head_flops.items())
        for layer in self.layers:
            total += (
                layer.flops
                * _kept_fraction(layer.out_total, layer.out_parts, fraction)
                * _kept_fraction(layer.in_total, layer.in_parts, fraction)
            )
        return total

    def group_flops(self, g: int, kept: Sequence[int], levels: np.ndarray) -> np.ndarray:
        """FLOPs of the layers group ``g`` touches, for each of ``levels``, others at ``kept``."""
        fraction = [k / n for k, n in zip(kept, self.sizes)]
        f = levels / self.sizes[g]
        result = self.head_flops.get(g, 0.0) * f
        for layer in self.layers:
            out_g = sum(c for h, c in layer.out_parts if h == g)
            in_g = sum(c for h, c in layer.in_parts if h == g)
            if not out_g and not in_g:
                continue
            out_rest = _kept_fraction(layer.out_total, layer.out_parts, fraction, skip=g)
            in_rest = _kept_fraction(layer.in_total, layer.in_parts, fraction, skip=g)
            r_out = out_rest + out_g * f / max(layer.out_total, 1)
            r_in = in_rest + in_g * f / max(layer.in_total, 1)
            result = result + layer.flops * r_out * r_in
        return np.asarray(result, dtype=np.float64)


def _kept_fraction(
    total: int, parts: list[tuple[int, int]], fraction: list[float], skip: int | None = None
) -> float:
    """Kept fraction of a layer side: untouched channels + each group's kept share.

    With ``skip`` the channels of group ``skip`` are left out (the caller adds them).
    """
    if total <= 0 or not parts:
        return 1.0
    touched = sum(c for _, c in parts)
    kept = total - touched + sum(c * fraction[g] for g, c in parts if g != skip)
    return kept / total


def build_cost_model(graph: ChannelGraph, counted: FlopCount) -> CostModel:
    """Map every Conv/Linear layer's FLOPs to the groups owning its output and input channels."""
    index = {id(group): g for g, group in enumerate(graph.groups)}
    model, names = graph.model, graph.layer_names
    layer_costs: dict[str, _LayerCost] = {}
    for name, module in model.named_modules():
        if isinstance(module, CONV_LINEAR):
            out_total, in_total = _io_channels(module)
            layer_costs[name] = _LayerCost(
                float(counted.per_module.get(name, 0)), out_total, in_total, name=name
            )
    tp_graph = graph.dependency_graph
    for group in graph.groups:
        g = index[id(group)]
        for dep, idxs in group.tp_group:
            name = (
                names.get(dep.target.module) if isinstance(dep.target.module, nn.Module) else None
            )
            if name not in layer_costs:
                continue
            module = dep.target.module
            depthwise = getattr(module, "groups", 1) > 1
            if tp_graph.is_out_channel_pruning_fn(dep.handler) or depthwise:
                # A depthwise conv's inputs are its outputs: its FLOPs are linear in the group.
                if not any(h == g for h, _ in layer_costs[name].out_parts):
                    layer_costs[name].out_parts.append((g, len(idxs)))
            else:
                layer_costs[name].in_parts.append((g, len(idxs)))
    head_flops = {
        index[id(group)]: float(counted.own(model, group.attention or ""))
        for group in graph.groups
        if group.kind == "heads"
    }
    touched = [c for c in layer_costs.values() if c.out_parts or c.in_parts]
    variable = sum(c.flops for c in touched) + sum(head_flops.values())
    return CostModel(
        sizes=[group.size for group in graph.groups],
        widths=[group.unit_width for group in graph.groups],
        total_flops=float(counted.total),
        constant=float(counted.total) - variable,
        layers=touched,
        head_flops=head_flops,
    )


def _io_channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.out_channels, module.in_channels
