"""Layer chains: ``layer -> [BatchNorm] -> ReLU/ReLU6 -> [pool, flatten] -> consumer`` on the fx graph.

Data-free compensation methods (UDFC, Neuron Merging, DFQ's cross-layer equalization) all rest
on one pattern: a Conv/Linear ``layer`` whose output channels, after an optional BatchNorm and a
ReLU-type activation, are read by exactly one next layer, the ``consumer``. Whatever the method
does to output channel ``c`` of ``layer`` (remove it, rescale it, quantize it) the consumer can
undo through its input channel ``c``, because nothing else reads that channel.

A :class:`LayerChain` is such a pattern, found on the ``torch.fx`` graph with every link the
only user of the link before it (so a conv whose output also feeds a residual add is never a
chain: the add would see the change uncompensated). Between the activation and the consumer
only channel-preserving linear ops may sit: ``Identity``, ``Dropout`` (eval), a global
``AdaptiveAvgPool`` (output size 1) and a ``flatten`` after that pool (channel ``c`` becomes
feature ``c`` of a Linear consumer). A folded BatchNorm (``nn.Identity``) is accepted where the
BatchNorm was. The consumer is a dense Conv, a depthwise Conv (``groups == in == out``) or a
Linear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerChain",
    "LayerChainError",
    "find_layer_chains",
    "forward_layer_order",
    "is_depthwise",
]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (*_CONVS, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_FLATTENS = (torch.flatten,)

Activation = Literal["relu", "relu6"]
ConsumerKind = Literal["dense", "depthwise", "linear"]


class LayerChainError(ValueError):
    """The model cannot be analysed (fx cannot trace it); the message says which model."""


@dataclass(frozen=True)
class LayerChain:
    """``layer -> norm -> activation -> through... -> consumer`` with single-user links.

    ``norm`` is the BatchNorm's module name (``None``: no norm, or an ``Identity`` left by BN
    folding when ``folded``); ``activation`` names the module (or the fx node of a function);
    ``through`` the pass-through nodes after it.
    """

    layer: str
    norm: str | None
    activation: str
    activation_kind: Activation
    through: tuple[str, ...]
    consumer: str
    consumer_kind: ConsumerKind


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every output channel reads only the input channel of the same index."""
    return (
        isinstance(module, _CONVS)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        raise LayerChainError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}:"
            f" {str(exc).splitlines()[0][:160]}); data-free compensation needs "
            "the layer graph"
        ) from None


def forward_layer_order(model: nn.Module) -> list[str]:
    """Conv/Linear module names in the order forward calls them (first call counts)."""
    modules = dict(model.named_modules())
    order: list[str] = []
    for node in _trace(model).nodes:
        if (
            node.op == "call_module"
            and isinstance(modules.get(node.target), _LAYERS)
            and node.target not in order
        ):
            order.append(str(node.target))
    return order


def find_layer_chains(model: nn.Module) -> dict[str, LayerChain]:
    """Every :class:`LayerChain` of ``model``, keyed by its ``layer`` (forward order).

    A layer called more than once in forward (shared weights) never heads a chain.
    """
    modules = dict(model.named_modules())
    graph = _trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    chains: dict[str, LayerChain] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _LAYERS):
            continue
        if calls[str(node.target)] > 1:
            continue
        chain = _follow(node, modules, calls)
        if chain is not None:
            chains[chain.layer] = chain
    return chains


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) != 1 or users[0].args[:1] != (node,):
        return None
    return users[0]


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def _activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> Activation | None:
    module = _module(node, modules)
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Hardtanh) and module.min_val == 0.0 and module.max_val == 6.0:
        return "relu6"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def _is_global_pool(module: nn.Module | None) -> bool:
    if not isinstance(module, _POOLS):
        return False
    size = module.output_size
    sizes = size if isinstance(size, tuple) else (size,)
    return all(s == 1 for s in sizes)


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    module = _module(node, modules)
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if node.op == "call_function" and node.target in _FLATTENS:
        return start == 1
    return node.op == "call_method" and node.target == "flatten" and start == 1


def _follow(
    start: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]
) -> LayerChain | None:
    """The chain headed by ``start``, or None where the pattern breaks."""
    layer = modules[str(start.target)]
    current, norm = start, None
    nxt = _only_user(current)
    # A BatchNorm (or the Identity folding left in its place) directly after the layer.
    if nxt is not None and isinstance(_module(nxt, modules), (*_NORMS, nn.Identity)):
        if isinstance(_module(nxt, modules), _NORMS):
            if _module(nxt, modules).num_features != _out_channels(layer):  # type: ignore[union-attr]
                return None
            norm = str(nxt.target)
        current, nxt = nxt, _only_user(nxt)
    if nxt is None:
        return None
    kind = _activation_kind(nxt, modules)
    if kind is None:
        return None
    activation, current = str(nxt.target) if nxt.op == "call_module" else nxt.name, nxt
    through: list[str] = []
    pooled = False
    while True:
        nxt = _only_user(current)
        if nxt is None:
            return None
        module = _module(nxt, modules)
        if isinstance(module, _LAYERS):
            break
        if isinstance(module, (nn.Identity, nn.Dropout)):
            pass
        elif _is_global_pool(module):
            pooled = True
        elif pooled and _is_flatten(nxt, modules):
            pass
        else:
            return None
        through.append(str(nxt.target) if nxt.op == "call_module" else nxt.name)
        current = nxt
    consumer_name = str(nxt.target)
    if calls.get(consumer_name, 0) > 1:
        return None
    consumer = modules[consumer_name]
    if isinstance(consumer, nn.Linear):
        consumer_kind: ConsumerKind = "linear"
        channels = consumer.in_features
    elif is_depthwise(consumer):
        if pooled:
            return None
        consumer_kind, channels = "depthwise", consumer.in_channels
    elif consumer.groups == 1:
        if pooled:
            return None
        consumer_kind, channels = "dense", consumer.in_channels
    else:  # grouped conv: channels are tied in balanced groups
        return None
    if channels != _out_channels(layer):
        return None
    return LayerChain(
        str(start.target), norm, activation, kind, tuple(through), consumer_name, consumer_kind
    )


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels
