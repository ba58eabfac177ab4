"""Transformer proxies kept from Serianni & Kalita (ACL 2023 SRW) and Zhou et al. (CVPR 2022,
"Training-free Transformer Architecture Search", TF-TAS): attention confidence, synaptic
diversity (attention weights) and synaptic saliency (MLP weights).

They apply to models with the zoo's attention layout (:func:`slimline.search.features.attention_modules`,
e.g. the zoo ``vit``). Gradients are of the cross-entropy loss on the mini-batch, train mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimline.search.features import attention_modules, find_classifier, tap
from slimline.search.proxies.base import Proxy, ProxyInputs, cross_entropy_backward, register_proxy

__all__ = ["AttentionConfidence", "SynapticDiversity", "SynapticSaliency", "head_confidence"]


def head_confidence(attention: torch.Tensor) -> torch.Tensor:
    """Per-head confidence (Voita et al., ACL 2019, sec. 4.1): the mean over samples and query
    tokens of the largest attention weight, for ``attention`` of shape ``(b, heads, N, N)``
    (rows sum to 1). Returns ``(heads,)``, each in ``[1/N, 1]``."""
    return attention.amax(dim=-1).mean(dim=(0, 2))


class _TransformerProxy(Proxy):
    def applicable(self, model: nn.Module) -> bool:
        return bool(attention_modules(model))

    def why_not_applicable(self, model: nn.Module) -> str:
        return (
            "it has no self-attention module with q/k Linears and num_heads/head_dim "
            "(transformer proxies are for the zoo 'vit')"
        )


def _attention_linears(model: nn.Module) -> list[nn.Linear]:
    seen: list[nn.Linear] = []
    for module in attention_modules(model):
        seen += [m for m in module.modules() if isinstance(m, nn.Linear)]
    return seen


def _mlp_linears(model: nn.Module) -> list[nn.Linear]:
    """Linears outside attention modules and other than the classifier and the layers before
    the first attention module (the patch embedding is a conv; a linear embedding would be
    excluded here too): the blocks' feed-forward layers."""
    in_attention = {id(m) for m in _attention_linears(model)}
    head = find_classifier(model)
    modules = list(model.modules())
    first_attention = min(modules.index(m) for m in attention_modules(model))
    return [
        m
        for i, m in enumerate(modules)
        if isinstance(m, nn.Linear)
        and id(m) not in in_attention
        and m is not head
        and i > first_attention
    ]


@register_proxy
class AttentionConfidence(_TransformerProxy):
    """Sum over layers and heads of head confidence (Serianni & Kalita's "attention
    confidence"): heads that already attend sharply at init score higher = better."""

    name = "attention_confidence"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        model.train()
        with torch.no_grad():
            maps = tap(model, inputs.x, attention=True).attention
        return float(sum(head_confidence(a).sum() for a in maps))


@register_proxy
class SynapticDiversity(_TransformerProxy):
    """``sum_m ||W_m||_* ||dL/dW_m||_*`` over the attention projections (TF-TAS eq. 4, nuclear
    norms as the rank proxy of the heads' diversity). Higher = better."""

    name = "synaptic_diversity"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        linears = _attention_linears(model)
        cross_entropy_backward(model, inputs)
        total = 0.0
        for layer in linears:
            if layer.weight.grad is None:
                continue
            weight_norm = torch.linalg.matrix_norm(layer.weight.detach(), ord="nuc")
            grad_norm = torch.linalg.matrix_norm(layer.weight.grad, ord="nuc")
            total += float(weight_norm * grad_norm)
        return total


@register_proxy
class SynapticSaliency(_TransformerProxy):
    """``sum |theta * dL/dtheta|`` over the feed-forward (MLP) weights of the blocks (TF-TAS
    eq. 6; SNIP restricted to the MLPs). Higher = better."""

    name = "synaptic_saliency"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        linears = _mlp_linears(model)
        cross_entropy_backward(model, inputs)
        return float(
            sum(
                (m.weight.detach() * m.weight.grad).abs().sum()
                for m in linears
                if m.weight.grad is not None
            )
        )
