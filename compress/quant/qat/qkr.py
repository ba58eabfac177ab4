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
from functools import partial
from typing import Any

import torch
import torch.nn as nn

__all__ = ["AttentionLayout", "attention_layout", "hf_qkr_forward", "merged_query_key",
           "qkr_attention", "qkr_forward", "verify_qkr"]


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
        if (getattr(module, "is_decoder", False) or getattr(module, "is_causal", False)
                or getattr(module, "is_cross_attention", False)
                or "Cross" in type(module).__name__):
            return None  # a cache, a causal mask or another sequence: not plain self-attention
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
    logits = logits * getattr(attention, "scaling", dim**-0.5)
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
    if not isinstance(rate, nn.Dropout | float):
        rate = getattr(attention, "attention_dropout", 0.0)
    rate = rate.p if isinstance(rate, nn.Dropout) else rate
    out = qkr_attention(attention, hidden_states, quantize_merged, quantize_input,
                        layout=layout, attention_mask=attention_mask,
                        dropout=float(rate or 0.0) if attention.training else 0.0)
    return out, None


def qkr_forward(attention: nn.Module, layout: AttentionLayout,
                quantize_merged: Callable[[torch.Tensor], torch.Tensor],
                quantize_input: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> Callable[..., Any]:
    """The forward that replaces ``attention.forward`` on the QKR path."""
    if layout.returns_weights:
        return partial(hf_qkr_forward, attention, layout, quantize_merged, quantize_input)
    return partial(qkr_attention, attention, quantize_merged=quantize_merged,
                   quantize_input=quantize_input, layout=layout)


@torch.no_grad()
def verify_qkr(model: nn.Module, attentions: dict[str, nn.Module],
               layouts: dict[str, AttentionLayout], example: torch.Tensor,
               rtol: float = 1e-4) -> None:
    """Run ``model`` once on ``example``, then each attention's QKR forward (identity quantizer)
    on the very inputs that attention received, and raise ValueError naming the first whose
    output differs: a module can match a layout by its attribute names and still compute
    something else (ALBERT adds its output projection, residual and LayerNorm inside; RoFormer
    rotates q and k), which QKR would silently change."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}

    def record(name: str):
        def hook(module, args, kwargs, output):
            seen.setdefault(name, (args, kwargs, output))
        return hook

    handles = [m.register_forward_hook(record(n), with_kwargs=True)
               for n, m in attentions.items()]
    try:
        model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    for name, attention in attentions.items():
        if name not in seen:
            continue
        args, kwargs, expected = seen[name]
        try:
            got = qkr_forward(attention, layouts[name], lambda m: m)(*args, **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"qkr: {name} ({type(attention).__name__}) cannot run on the "
                             f"merged query-key path ({exc}); set qkr: false") from None
        got, expected = (t[0] if isinstance(t, tuple) else t for t in (got, expected))
        error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
        if error > rtol:
            raise ValueError(
                f"qkr: {name} ({type(attention).__name__}) does not compute plain softmax "
                f"self-attention of its q/k/v projections (the merged form is off by "
                f"{error:.2g} relative): QKR would change the model; set qkr: false")
