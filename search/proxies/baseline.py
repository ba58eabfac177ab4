"""Size baselines every proxy should beat: parameter count and FLOPs (bigger nets of one family
usually train to higher accuracy, so higher = better)."""

from __future__ import annotations

import torch.nn as nn

from slimline.compress.prune.flops import count_flops, count_params
from slimline.search.proxies.base import Proxy, ProxyInputs, register_proxy

__all__ = ["Flops", "Params"]


@register_proxy
class Params(Proxy):
    """Number of parameters (shared tensors once)."""

    name = "params"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        return float(count_params(model))


@register_proxy
class Flops(Proxy):
    """FLOPs of one sample's forward pass (2 per multiply-accumulate, :mod:`slimline.compress.prune.flops`)."""

    name = "flops"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        return float(count_flops(model, inputs.x[:1]).total)
