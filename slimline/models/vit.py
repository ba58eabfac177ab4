"""Small Vision Transformer (Dosovitskiy et al., 2021) with pre-norm blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    Separate Linears (rather than one fused qkv) let pruning drop whole heads from each projection,
    and the explicit softmax (not F.scaled_dot_product_attention) exports to plain MatMul/Softmax.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # Shapes come from the attributes so that head pruning only has to update them.
        q, k, v = (
            t(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for t in (self.q, self.k, self.v)
        )
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim**-0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        input_size: tuple[int, int],
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ):
        super().__init__()
        num_patches = (input_size[0] // patch_size) * (input_size[1] // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model("vit")
def vit(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (8, 8),
    patch_size: int = 2,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> nn.Module:
    """Small ViT: conv patch embedding, cls token, pre-norm blocks with separate q/k/v Linears."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 2:
        raise ValueError(f"vit expects input_size=(H, W), got {input_size!r}")
    if patch_size < 1 or any(s % patch_size for s in size):
        raise ValueError(
            f"vit input_size {size} must be divisible by patch_size={patch_size} in each dimension"
        )
    if heads < 1 or dim % heads:
        raise ValueError(f"vit dim={dim} must be divisible by heads={heads}")
    return VisionTransformer(
        num_classes, in_channels, (size[0], size[1]), patch_size, dim, depth, heads, mlp_ratio
    )
