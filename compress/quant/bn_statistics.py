"""Activation statistics without data: what BatchNorm remembers, carried through the graph.

A BatchNorm's running statistics say that, on the training data, its output channel ``c`` had
mean ``beta_c`` and standard deviation ``|gamma_c|`` (Nagel et al., 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", sec. 4.2: the pre-activation is
modelled as a normal ``N(beta, gamma^2)``). After BN folding that is the folded conv's output.
From there every tensor of the model gets per-channel :class:`ChannelStats` by these rules:

=====================  =========================================================================
model input            ``N(0, input_std^2)``: slimline datasets are standardised (documented
                       assumption; ``input_std`` may be changed)
Conv/Linear + BN       ``N(beta, gamma^2)`` from the BN (recorded before folding)
Conv/Linear, no BN     mean ``W . mean_in + b``, variance ``sum W^2 var_in`` (inputs independent)
ReLU, ReLU6, clamp     moments of the clipped normal (exact for a normal input); range clipped
add                    means and variances add (branches taken as independent)
pool, flatten,         unchanged (a mean of a channel keeps its mean; the variance is kept as
Identity, Dropout      an upper bound, since the spatial correlation is unknown)
=====================  =========================================================================

The *range* of a tensor is ``mean +- sigmas * std`` per channel, clipped by the activation that
produced it; a quantization grid covers the smallest low and largest high over channels.
Anything else in the graph (a multiply, a reshape that mixes channels) has no data-free rule
and raises :class:`DataFreeRangeError` naming the node when a needed tensor depends on it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ChannelStats",
    "DataFreeRangeError",
    "bn_output_stats",
    "clipped_normal_moments",
    "propagate_stats",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.Flatten,
)
_ADDS = (operator.add, operator.iadd, torch.add)
_FLATTENS = (torch.flatten,)
_RELUS = (F.relu, torch.relu, torch.relu_)


class DataFreeRangeError(ValueError):
    """A tensor whose range cannot be derived without data (names the fx node)."""


@dataclass
class ChannelStats:
    """Per-channel mean, standard deviation and range ``[low, high]`` of one tensor (float64;
    a single entry broadcasts to every channel)."""

    mean: torch.Tensor
    std: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def normal(cls, mean: torch.Tensor, std: torch.Tensor, sigmas: float) -> ChannelStats:
        mean, std = mean.double(), std.double().abs()
        return cls(mean, std, mean - sigmas * std, mean + sigmas * std)

    def expand(self, channels: int) -> ChannelStats:
        if self.mean.numel() == channels:
            return self
        if self.mean.numel() != 1:
            raise ValueError(f"{self.mean.numel()} channel statistics for {channels} channels")
        return ChannelStats(
            *(
                t.reshape(1).expand(channels).clone()
                for t in (self.mean, self.std, self.low, self.high)
            )
        )

    def scalar(self) -> ChannelStats:
        """One entry summarising all channels (when a layout op loses the channel identity)."""
        variance = (self.std**2 + self.mean**2).mean() - self.mean.mean() ** 2
        return ChannelStats(
            self.mean.mean().reshape(1),
            variance.clamp(min=0).sqrt().reshape(1),
            self.low.min().reshape(1),
            self.high.max().reshape(1),
        )

    @property
    def range(self) -> tuple[float, float]:
        """(smallest low, largest high) over channels: what a per-tensor grid must cover."""
        return float(self.low.min()), float(self.high.max())


def clipped_normal_moments(
    mean: torch.Tensor, std: torch.Tensor, low: float = 0.0, high: float = math.inf
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``clamp(X, low, high)`` for ``X ~ N(mean, std^2)``.

    With ``a = (low - mean) / std``, ``b = (high - mean) / std``, ``P = Phi(b) - Phi(a)``::

        E[Y]   = low Phi(a) + high (1 - Phi(b)) + mean P + std (phi(a) - phi(b))
        E[Y^2] = low^2 Phi(a) + high^2 (1 - Phi(b)) + (mean^2 + std^2) P
                 + 2 mean std (phi(a) - phi(b)) + std^2 (a phi(a) - b phi(b))

    (``low = 0, high = inf`` is Nagel et al.'s rectified-normal mean, sec. 4.2.) ``std = 0``
    gives the clamped constant.
    """
    mean, std = mean.double(), std.double().abs()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    a, b = (low - mean) / safe, (high - mean) / safe

    def cdf(z: torch.Tensor) -> torch.Tensor:
        return normal.cdf(z.clamp(-40, 40))

    def pdf(z: torch.Tensor) -> torch.Tensor:
        return torch.exp(normal.log_prob(z.clamp(-40, 40)))

    below, above = cdf(a), 1 - cdf(b)
    inside = cdf(b) - cdf(a)
    low_term = low * below if math.isfinite(low) else torch.zeros_like(mean)
    high_term = high * above if math.isfinite(high) else torch.zeros_like(mean)
    low_sq = low**2 * below if math.isfinite(low) else torch.zeros_like(mean)
    high_sq = high**2 * above if math.isfinite(high) else torch.zeros_like(mean)
    a_pdf = a * pdf(a) if math.isfinite(low) else torch.zeros_like(mean)
    b_pdf = b * pdf(b) if math.isfinite(high) else torch.zeros_like(mean)
    first = low_term + high_term + mean * inside + safe * (pdf(a) - pdf(b))
    second = (
        low_sq
        + high_sq
        + (mean**2 + safe**2) * inside
        + 2 * mean * safe * (pdf(a) - pdf(b))
        + safe**2 * (a_pdf - b_pdf)
    )
    clamped = mean.clamp(low, high)
    first = torch.where(std > 0, first, clamped)
    variance = torch.where(std > 0, second - first**2, torch.zeros_like(mean))
    return first, variance.clamp(min=0).sqrt()


@torch.no_grad()
def bn_output_stats(
    model: nn.Module, pairs: list[tuple[str, str]], sigmas: float
) -> dict[str, ChannelStats]:
    """``N(beta, gamma^2)`` of each (layer, BatchNorm) pair's output, keyed by the layer name.

    Call before folding: the stats then describe the folded layer's output.
    """
    stats = {}
    for layer, norm_name in pairs:
        norm = model.get_submodule(norm_name)
        beta = norm.bias.detach() if norm.bias is not None else torch.zeros(norm.num_features)
        gamma = norm.weight.detach() if norm.weight is not None else torch.ones(norm.num_features)
        stats[layer] = ChannelStats.normal(beta, gamma, sigmas)
    return stats


@torch.no_grad()
def propagate_stats(
    model: nn.Module, layer_stats: dict[str, ChannelStats], *, sigmas: float, input_std: float = 1.0
) -> dict[str, ChannelStats | DataFreeRangeError]:
    """:class:`ChannelStats` of every fx node's output (by node name; for modules also by
    :class:`~slimline.compress.quant.state.TensorPoint` key ``"<module>:input"`` / ``"<module>:output"``),
    or the error saying why a tensor has none. ``layer_stats`` are the known
    outputs of (folded) Conv/Linear layers, e.g. from :func:`bn_output_stats`."""
    modules = dict(model.named_modules())
    graph = fx.symbolic_trace(model).graph
    found: dict[str, ChannelStats | DataFreeRangeError] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        try:
            found[node.name] = _node_stats(node, modules, found, layer_stats, sigmas, input_std)
        except DataFreeRangeError as exc:
            found[node.name] = exc
        if node.op == "call_module":  # keyed like TensorPoint: "<module>:input|output"
            found[f"{node.target}:output"] = found[node.name]
            arg = node.args[0] if node.args else None
            if isinstance(arg, fx.Node) and arg.name in found:
                found[f"{node.target}:input"] = found[arg.name]
    return found


def _input(
    node: fx.Node, found: dict[str, ChannelStats | DataFreeRangeError], index: int = 0
) -> ChannelStats:
    arg = node.args[index]
    if not isinstance(arg, fx.Node):
        raise DataFreeRangeError(f"node {node.name!r}: argument {index} is not a tensor")
    stats = found.get(arg.name)
    if isinstance(stats, DataFreeRangeError):
        raise stats
    if stats is None:
        raise DataFreeRangeError(f"node {node.name!r}: no statistics for its input {arg.name!r}")
    return stats


def _node_stats(
    node: fx.Node,
    modules: dict[str, nn.Module],
    found: dict[str, ChannelStats | DataFreeRangeError],
    layer_stats: dict[str, ChannelStats],
    sigmas: float,
    input_std: float,
) -> ChannelStats:
    if node.op == "placeholder":
        return ChannelStats.normal(torch.zeros(1), torch.full((1,), float(input_std)), sigmas)
    if node.op == "call_module":
        module = modules[str(node.target)]
        name = str(node.target)
        if name in layer_stats:
            return layer_stats[name]
        if isinstance(module, (*_CONVS, nn.Linear)):
            return _linear_layer(module, _input(node, found), sigmas)
        if isinstance(module, _NORMS):
            return ChannelStats.normal(
                module.bias.detach()
                if module.bias is not None
                else torch.zeros(module.num_features),
                module.weight.detach()
                if module.weight is not None
                else torch.ones(module.num_features),
                sigmas,
            )
        if isinstance(module, nn.ReLU6):
            return _clip(_input(node, found), 0.0, 6.0)
        if isinstance(module, nn.ReLU):
            return _clip(_input(node, found), 0.0, math.inf)
        if isinstance(module, nn.Hardtanh):
            return _clip(_input(node, found), module.min_val, module.max_val)
        if isinstance(module, _PASS_MODULES):
            return _input(node, found)
        raise DataFreeRangeError(
            f"layer {name!r} ({type(module).__name__}) has no data-free "
            "statistics rule; quantize with a calibration set instead"
        )
    if node.op == "call_function" and node.target in _RELUS:
        return _clip(_input(node, found), 0.0, math.inf)
    if node.op == "call_function" and node.target in _ADDS:
        first, second = _input(node, found, 0), _input(node, found, 1)
        channels = max(first.mean.numel(), second.mean.numel())
        first, second = first.expand(channels), second.expand(channels)
        mean = first.mean + second.mean
        std = (first.std**2 + second.std**2).sqrt()
        return ChannelStats(
            mean,
            std,
            torch.maximum(first.low + second.low, mean - sigmas * std),
            torch.minimum(first.high + second.high, mean + sigmas * std),
        )
    if (node.op == "call_function" and node.target in _FLATTENS) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return _input(node, found)  # channel c stays feature c after a global pool
    for arg in node.args:  # an input without statistics is the first thing to report
        if isinstance(arg, fx.Node) and isinstance(found.get(arg.name), DataFreeRangeError):
            raise found[arg.name]  # type: ignore[misc]
    raise DataFreeRangeError(
        f"node {node.name!r} ({node.op} {node.target}) has no data-free "
        "statistics rule; quantize with a calibration set instead"
    )


def _clip(stats: ChannelStats, low: float, high: float) -> ChannelStats:
    mean, std = clipped_normal_moments(stats.mean, stats.std, low, high)
    return ChannelStats(mean, std, stats.low.clamp(low, high), stats.high.clamp(low, high))


def _linear_layer(module: nn.Module, inputs: ChannelStats, sigmas: float) -> ChannelStats:
    """Moments of ``W x + b`` with independent inputs; the range from a normal model of it."""
    weight = module.weight.detach().double()
    depthwise = isinstance(module, _CONVS) and module.groups > 1
    in_channels = (
        weight.shape[0]
        if depthwise
        else weight.shape[1] * (module.groups if isinstance(module, _CONVS) else 1)
    )
    if isinstance(module, _CONVS) and module.groups > 1 and not depthwise:
        raise DataFreeRangeError("grouped convolutions have no data-free statistics rule")
    try:
        inputs = inputs.expand(in_channels)
    except ValueError:
        inputs = inputs.scalar().expand(in_channels)
    bias = (
        module.bias.detach().double()
        if module.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64)
    )
    if depthwise:  # channel c reads only input channel c
        flat = weight.flatten(1)
        mean = bias + flat.sum(1) * inputs.mean
        var = (flat**2).sum(1) * inputs.std**2
    else:
        summed = weight.flatten(2).sum(2) if weight.ndim > 2 else weight
        squared = (weight**2).flatten(2).sum(2) if weight.ndim > 2 else weight**2
        mean = bias + summed @ inputs.mean
        var = squared @ inputs.std**2
    return ChannelStats.normal(mean, var.sqrt(), sigmas)
