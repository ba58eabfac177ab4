"""QKR: query-key reparameterization (Liu et al., ICML 2023, OFQ sec. 4.3).

Attention logits of head h are ``(x W_qᵀ + b_q)(x W_kᵀ + b_k)ᵀ``. Expanded, the terms that vary
along the key axis (the only ones softmax sees) are

    x (W_q,hᵀ W_k,h) xᵀ  +  1 (x W_k,hᵀ b_q,h)ᵀ

(``x W_qᵀ b_k`` and ``b_q·b_k`` are constant per query row and cancel in the softmax), so QKR
quantizes the merged ``M_h = W_q,hᵀ W_k,h`` (D × D) instead of ``W_q`` and ``W_k`` separately;
the gradient reaches ``W_q``/``W_k`` through the product. With an identity quantizer the
function is exactly the original attention (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["merged_query_key", "qkr_attention"]


def merged_query_key(attention: nn.Module) -> torch.Tensor:
    """``M`` of shape (heads, D, D): ``M_h = W_q,hᵀ W_k,h``."""
    heads, dim = attention.num_heads, attention.head_dim
    w_q = attention.q.weight.reshape(heads, dim, -1)
    w_k = attention.k.weight.reshape(heads, dim, -1)
    return w_q.transpose(1, 2) @ w_k


def qkr_attention(
    attention: nn.Module,
    x: torch.Tensor,
    quantize_merged: Callable[[torch.Tensor], torch.Tensor],
    quantize_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward of :class:`slimline.models.vit.Attention` with the merged query-key product
    passed through ``quantize_merged`` (applied to each head's D × D matrix, rows = axis 0).

    ``quantize_input`` quantizes ``x`` on the query-key path; ``attention.v`` gets the raw
    ``x`` (its own input quantizer, if any, runs as a hook)."""
    b, n, _ = x.shape
    heads, dim = attention.num_heads, attention.head_dim
    x_in = quantize_input(x) if quantize_input is not None else x
    merged = torch.stack([quantize_merged(m) for m in merged_query_key(attention)])
    key_bias = attention.k.weight.reshape(heads, dim, -1).transpose(1, 2) @ (
        attention.q.bias.reshape(heads, dim, 1)
    )  # (heads, D, 1)
    xh = x_in.unsqueeze(1)  # (b, 1, n, D)
    logits = (xh @ merged) @ xh.transpose(-2, -1) + (xh @ key_bias).transpose(-2, -1)
    attn = torch.softmax(logits * dim**-0.5, dim=-1)
    v = attention.v(x).reshape(b, n, heads, dim).transpose(1, 2)
    out = (attn @ v).transpose(1, 2).reshape(b, n, heads * dim)
    return attention.proj(out)
