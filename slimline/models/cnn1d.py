"""1-D convolutional classifier for channels-first sequences of shape (N, C, L)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


class CNN1d(nn.Module):
    def __init__(
        self, num_classes: int, in_channels: int, channels: Sequence[int], kernel_size: int
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(channels):
            # Full resolution in the first block, then halve the length per block.
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv1d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
                nn.BatchNorm1d(cout),
                nn.ReLU(),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@register_model("cnn1d")
def cnn1d(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (40,),
    channels: Sequence[int] = (32, 64, 64),
    kernel_size: int = 5,
) -> nn.Module:
    """1-D CNN: Conv1d+BN+ReLU blocks (stride 2 after the first), global average pool, Linear."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 1:
        raise ValueError(f"cnn1d expects input_size=(L,), got {input_size!r}")
    if not channels:
        raise ValueError("cnn1d needs at least one entry in channels")
    if kernel_size < 1 or kernel_size % 2 == 0:
        # An even kernel with padding k // 2 would shift the sequence by one step per block.
        raise ValueError(f"cnn1d kernel_size must be a positive odd number, got {kernel_size}")
    return CNN1d(num_classes, in_channels, tuple(channels), kernel_size)
