"""Transformer proxies kept from Serianni & Kalita (ACL 2023 SRW) and Zhou et al. (CVPR 2022,
"Training-free Transformer Architecture Search", TF-TAS): attention confidence, synaptic
diversity (attention weights) and synaptic saliency (MLP weights).

They apply to every model with a recognised self-attention layout
(:mod:`slimline.search.attention_sites`): the zoo ``vit``, ``nn.MultiheadAttention`` (also in
``nn.TransformerEncoderLayer``), and Hugging Face BERT, ViT and GPT-2 (fused ``c_attn``). Fused
projections are split into their query/key/value parts, so one network scores the same in any
layout. Gradients are of the cross-entropy loss on the mini-batch, train mode; a Hugging Face
model's ``ModelOutput`` is read through its ``logits``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimline.search.attention_sites import (
    AttentionSite,
    WeightView,
    attention_sites,
    block_weights,
)
from slimline.search.features import find_classifier, tap
from slimline.search.proxies.base import (
    Proxy,
    ProxyInputs,
    cross_entropy_backward,
    register_proxy,
)

__all__ = [
    "AttentionConfidence",
    "SynapticDiversity",
    "SynapticSaliency",
    "attention_projections",
    "head_confidence",
    "mlp_layers",
]


def head_confidence(attention: torch.Tensor) -> torch.Tensor:
    """Per-head confidence (Voita et al., ACL 2019, sec. 4.1): the mean over samples and query
    tokens of the largest attention weight, for ``attention`` of shape ``(b, heads, N, N)``
    (rows sum to 1). Returns ``(heads,)``, each in ``[1/N, 1]``."""
    return attention.amax(dim=-1).mean(dim=(0, 2))


class _TransformerProxy(Proxy):
    def applicable(self, model: nn.Module) -> bool:
        return bool(attention_sites(model))

    def why_not_applicable(self, model: nn.Module) -> str:
        return (
            "it has no self-attention module in a recognised layout (zoo vit, "
            "nn.MultiheadAttention, Hugging Face BERT/ViT/GPT-2)"
        )


def attention_projections(model: nn.Module) -> list[WeightView]:
    """Query, key, value and output projection matrices of every attention site, in order."""
    sites: list[AttentionSite] = attention_sites(model)
    return [view for site in sites for view in site.projections.values()]


def mlp_layers(model: nn.Module) -> list[nn.Module]:
    """The feed-forward layers of the transformer blocks (``nn.Linear`` or Hugging Face
    ``Conv1D``), neither attention projections nor the classifier
    (:func:`slimline.search.attention_sites.block_weights`)."""
    head = find_classifier(model)
    return block_weights(model, attention_sites(model), exclude=[head] if head else [])


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
    norms as the rank proxy of the heads' diversity), each of query, key, value and output
    its own matrix. Higher = better."""

    name = "synaptic_diversity"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        views = attention_projections(model)
        cross_entropy_backward(model, inputs)
        total = 0.0
        for view in views:
            grad = view.grad()
            if grad is None:
                continue
            weight_norm = torch.linalg.matrix_norm(view.value(), ord="nuc")
            total += float(weight_norm * torch.linalg.matrix_norm(grad, ord="nuc"))
        return total


@register_proxy
class SynapticSaliency(_TransformerProxy):
    """``sum |theta * dL/dtheta|`` over the feed-forward (MLP) weights of the blocks (TF-TAS
    eq. 6; SNIP restricted to the MLPs). Higher = better."""

    name = "synaptic_saliency"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        layers = mlp_layers(model)
        cross_entropy_backward(model, inputs)
        return float(
            sum(
                (m.weight.detach() * m.weight.grad).abs().sum()
                for m in layers
                if m.weight.grad is not None
            )
        )
