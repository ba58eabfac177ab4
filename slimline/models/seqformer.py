"""A transformer encoder over sequences, built from torch's own ``nn.TransformerEncoder``.

The zoo's sequence transformer (MNIST-1D, any ``(N, C, L)`` channels-first input): each time
step is a token (a linear embedding of its C features plus a learned position embedding),
pre-norm encoder layers with ``nn.MultiheadAttention``, mean pooling, a linear classifier. It is
what the transformer search space and its ground-truth table are built on, so torch's attention
layout, not only slimline's ViT, is what the transformer proxies are measured on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


class SequenceTransformer(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, length: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float):
        super().__init__()
        self.embed = nn.Linear(in_channels, dim)
        self.position = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor=False: the fast path would bypass the layers' Python modules
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.transpose(1, 2)) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


@register_model("seqformer")
def seqformer(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (40,),
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    mlp_ratio: float = 2.0,
) -> nn.Module:
    """Transformer encoder (torch layers) over (N, C, L) sequences: a token per time step."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 1:
        raise ValueError(f"seqformer expects input_size=(L,), got {input_size!r}")
    if dim < 1 or depth < 1 or heads < 1 or dim % heads:
        raise ValueError(f"seqformer needs dim, depth, heads >= 1 and dim divisible by heads, "
                         f"got dim={dim}, depth={depth}, heads={heads}")
    return SequenceTransformer(num_classes, in_channels, size[0], dim, depth, heads, mlp_ratio)
