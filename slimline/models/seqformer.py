"""A transformer encoder over sequences, built from torch's own ``nn.TransformerEncoder``.

The zoo's sequence transformer (MNIST-1D, any ``(N, C, L)`` channels-first input): each time
step is a token (a linear embedding of its C features plus a learned position embedding),
pre-norm encoder layers with ``nn.MultiheadAttention``, mean pooling, a linear classifier.
``patch_size=p`` makes a token of every p consecutive steps (C * p features, L / p tokens). It is
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
                 heads: int, mlp_ratio: float, patch_size: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.embed = nn.Linear(in_channels * patch_size, dim)
        self.position = nn.Parameter(torch.zeros(1, length // patch_size, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor=False: the fast path would bypass the layers' Python modules
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, L) -> (N, L / p, C * p): a token per patch of p steps (p = 1: x.transpose(1, 2))
        n, c, length = x.shape
        p = self.patch_size
        x = x.reshape(n, c, length // p, p).permute(0, 2, 1, 3).flatten(2)
        tokens = self.embed(x) + self.position
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
    patch_size: int = 1,
) -> nn.Module:
    """Transformer encoder (torch layers) over (N, C, L) sequences: a token per ``patch_size``
    time steps."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 1:
        raise ValueError(f"seqformer expects input_size=(L,), got {input_size!r}")
    if patch_size < 1 or size[0] % patch_size:
        raise ValueError(f"seqformer needs a patch_size >= 1 dividing the length {size[0]}, "
                         f"got {patch_size}")
    if dim < 1 or depth < 1 or heads < 1 or dim % heads:
        raise ValueError(f"seqformer needs dim, depth, heads >= 1 and dim divisible by heads, "
                         f"got dim={dim}, depth={depth}, heads={heads}")
    return SequenceTransformer(num_classes, in_channels, size[0], dim, depth, heads, mlp_ratio,
                               patch_size)
