"""QKR: query-key reparameterization (Liu et al., ICML 2023, OFQ sec. 4.3).

Attention logits of head h are ``(x W_qᵀ + b_q)(x W_kᵀ + b_k)ᵀ``. Expanded, the terms that vary
along the key axis (the only ones softmax sees) are

    x (W_q,hᵀ W_k,h) xᵀ  +  1 (x W_k,hᵀ b_q,h)ᵀ

(``x W_qᵀ b_k`` and ``b_q·b_k`` are constant per query row and cancel in the softmax), so QKR
quantizes the merged ``M_h = W_q,hᵀ W_k,h`` (D × D) instead of ``W_q`` and ``W_k`` separately;
the gradient reaches ``W_q``/``W_k`` through the product. With an identity quantizer the
function is exactly the original attention (up to float rounding).

The attention modules it rewrites are described by an :class:`AttentionLayout` (which Linears
are q, k, v and the output projection, where the head count and size live): slimline's ViT,
BERT-style ``SelfAttention`` (RoBERTa, ...) and ``q_proj/k_proj/v_proj/o_proj`` attention
(HF ViT). Attention that rotates q and k by position (rotary: Llama) or attends to another
sequence (cross-attention, decoders with a cache) has no such expansion and is not rewritten.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["AttentionLayout", "attention_layout", "hf_qkr_forward", "merged_query_key",
           "qkr_attention"]


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention module keeps its parts (attribute names)."""

    q: str
    k: str
    v: str
    out: str | None  # output projection inside the module (None: applied by the caller)
    heads: str
    head_dim: str
    returns_weights: bool  # transformers: forward returns (output, attention weights)


ZOO = AttentionLayout("q", "k", "v", "proj", "num_heads", "head_dim", returns_weights=False)
BERT = AttentionLayout("query", "key", "value", None, "num_attention_heads",
                       "attention_head_size", returns_weights=True)
PROJ = AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads",
                       "head_dim", returns_weights=True)
LAYOUTS = (ZOO, BERT, PROJ)


def attention_layout(module: nn.Module) -> AttentionLayout | None:
    """The layout of ``module`` if QKR can rewrite it, else None."""
    for layout in LAYOUTS:
        parts = [layout.q, layout.k, layout.v] + ([layout.out] if layout.out else [])
        if not all(isinstance(getattr(module, p, None), nn.Linear) for p in parts):
            continue
        if not (hasattr(module, layout.heads) and hasattr(module, layout.head_dim)):
            continue
        if getattr(module, "is_decoder", False) or getattr(module, "is_causal", False):
            return None  # a cache and a causal mask: not a plain self-attention
        if "position_embeddings" in inspect.signature(module.forward).parameters:
            return None  # rotary q/k: logits are not x M xᵀ
        return layout
    return None


def merged_query_key(attention: nn.Module, layout: AttentionLayout = ZOO) -> torch.Tensor:
    """``M`` of shape (heads, D, D): ``M_h = W_q,hᵀ W_k,h``."""
    heads, dim = getattr(attention, layout.heads), getattr(attention, layout.head_dim)
    w_q = getattr(attention, layout.q).weight.reshape(heads, dim, -1)
    w_k = getattr(attention, layout.k).weight.reshape(heads, dim, -1)
    return w_q.transpose(1, 2) @ w_k


def qkr_attention(
    attention: nn.Module,
    x: torch.Tensor,
    quantize_merged: Callable[[torch.Tensor], torch.Tensor],
    quantize_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    layout: AttentionLayout = ZOO,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The attention output with the merged query-key product passed through
    ``quantize_merged`` (applied to each head's D × D matrix, rows = axis 0).

    ``quantize_input`` quantizes ``x`` on the query-key path; the v projection gets the raw
    ``x`` (its own input quantizer, if any, runs as a hook). ``attention_mask`` as transformers
    passes it: boolean (True = attend) or additive, broadcastable to (batch, heads, n, n)."""
    b, n, _ = x.shape
    heads, dim = getattr(attention, layout.heads), getattr(attention, layout.head_dim)
    q, k, v = (getattr(attention, p) for p in (layout.q, layout.k, layout.v))
    x_in = quantize_input(x) if quantize_input is not None else x
    merged = torch.stack([quantize_merged(m) for m in merged_query_key(attention, layout)])
    xh = x_in.unsqueeze(1)  # (b, 1, n, D)
    logits = (xh @ merged) @ xh.transpose(-2, -1)
    if q.bias is not None:
        key_bias = k.weight.reshape(heads, dim, -1).transpose(1, 2) @ q.bias.reshape(heads, dim, 1)
        logits = logits + (xh @ key_bias).transpose(-2, -1)  # (heads, D, 1) -> per key
    logits = logits * dim**-0.5
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + attention_mask
    attn = torch.softmax(logits, dim=-1)
    if dropout > 0.0:
        attn = nn.functional.dropout(attn, dropout, training=True)
    values = v(x).reshape(b, n, heads, dim).transpose(1, 2)
    out = (attn @ values).transpose(1, 2).reshape(b, n, heads * dim)
    return getattr(attention, layout.out)(out) if layout.out else out


def hf_qkr_forward(attention: nn.Module, layout: AttentionLayout,
                   quantize_merged: Callable[[torch.Tensor], torch.Tensor],
                   quantize_input: Callable[[torch.Tensor], torch.Tensor] | None,
                   hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers self-attention ``forward`` on the QKR path (returns ``(output, None)``:
    no attention weights, as with SDPA)."""
    if kwargs.get("encoder_hidden_states") is not None:
        raise ValueError("qkr: cross-attention has no merged query-key form")
    rate = getattr(attention, "dropout", None)  # BERT: an nn.Dropout; HF ViT: a float
    rate = rate.p if isinstance(rate, nn.Dropout) else getattr(attention, "attention_dropout", 0.0)
    out = qkr_attention(attention, hidden_states, quantize_merged, quantize_input,
                        layout=layout, attention_mask=attention_mask,
                        dropout=float(rate or 0.0) if attention.training else 0.0)
    return out, None
