"""1-D convolutional classifier for channels-first sequences of shape (N, C, L)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


class CNN1d(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        channels: Sequence[int],
        kernel_sizes: Sequence[int],
        depths: Sequence[int],
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, (cout, kernel, depth) in enumerate(zip(channels, kernel_sizes, depths, strict=True)):
            for repeat in range(depth):
                # Full resolution in the first stage, then halve the length once per stage.
                stride = 2 if i > 0 and repeat == 0 else 1
                layers += [
                    nn.Conv1d(cin, cout, kernel, stride, kernel // 2, bias=False),
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
    kernel_size: int | Sequence[int] = 5,
    depths: Sequence[int] | None = None,
) -> nn.Module:
    """1-D CNN: stages of Conv1d+BN+ReLU blocks (the first block of every stage after the first
    has stride 2), global average pool, Linear. ``kernel_size`` may be one per stage and
    ``depths`` (blocks per stage, default 1 each) repeats a stage's block at stride 1."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 1:
        raise ValueError(f"cnn1d expects input_size=(L,), got {input_size!r}")
    if not channels:
        raise ValueError("cnn1d needs at least one entry in channels")
    stages = len(channels)
    kernels = [kernel_size] * stages if isinstance(kernel_size, int) else list(kernel_size)
    blocks = [1] * stages if depths is None else [int(d) for d in depths]
    if len(kernels) != stages or len(blocks) != stages:
        raise ValueError(
            f"cnn1d needs one kernel_size and one depth per stage ({stages} channels), got "
            f"kernel_size={kernel_size!r}, depths={depths!r}"
        )
    if any(k < 1 or k % 2 == 0 for k in kernels):
        # An even kernel with padding k // 2 would shift the sequence by one step per block.
        raise ValueError(f"cnn1d kernel_size must be positive odd numbers, got {kernel_size!r}")
    if any(d < 1 for d in blocks):
        raise ValueError(f"cnn1d depths must be >= 1, got {depths!r}")
    return CNN1d(num_classes, in_channels, tuple(channels), tuple(kernels), tuple(blocks))
