"""ResNet-style net with per-stage width, depth and kernel size: the family of the CNN search
space in :mod:`slimline.search.space`.

The network is ``stem -> stages -> head`` and nothing else, and each part is its own module
(:class:`FlexStem`, :class:`FlexBlock`, :class:`FlexHead`) that can be built alone, so a
latency lookup table can time every distinct part once and sum them per architecture.
``resnet_flex(widths=(w, 2w, 4w), depths=(n, n, n))`` is the zoo's ``resnet`` (depth 6n+2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model
from slimline.models.resnet import BasicBlock


class FlexStem(nn.Module):
    """3x3 stride-1 conv + BN + ReLU (an ImageNet 7x7/2 stem would erase 8x8 inputs)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


# The search space's block is the zoo ResNet's BasicBlock (with a kernel size): one definition,
# so a searched architecture and the reference ResNet share layer names and behaviour.
FlexBlock = BasicBlock


class FlexHead(nn.Module):
    """Global average pool + linear classifier."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class FlexNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        kernels: Sequence[int],
        strides: Sequence[int],
        expansions: Sequence[float] | None = None,
        skips: Sequence[bool] | None = None,
    ):
        super().__init__()
        expansions = expansions or [1.0] * len(widths)
        skips = skips if skips is not None and len(skips) else [True] * len(widths)
        self.stem = FlexStem(in_channels, widths[0])
        stages, channels = [], widths[0]
        for width, depth, kernel, stride, expansion, skip in zip(
            widths, depths, kernels, strides, expansions, skips, strict=True
        ):
            blocks = [FlexBlock(channels, width, stride, kernel, expansion, skip)]
            blocks += [FlexBlock(width, width, 1, kernel, expansion, skip)
                       for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = FlexHead(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model("resnet_flex")
def resnet_flex(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (8, 8),
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (1, 1, 1),
    kernels: Sequence[int] = (3, 3, 3),
    strides: Sequence[int] = (1, 2, 2),
    expansions: Sequence[float] | None = None,
    skips: Sequence[bool] | None = None,
) -> nn.Module:
    """ResNet-style net, width/depth/kernel (optionally inner-width expansion and residual on/off)
    per stage: the search space family; stem = widths[0]."""
    if len(tuple(input_size)) != 2:
        raise ValueError(f"resnet_flex expects input_size=(H, W), got {input_size!r}")
    lengths = {len(widths), len(depths), len(kernels), len(strides)}
    if len(lengths) != 1 or not widths:
        raise ValueError(
            "resnet_flex needs one entry per stage in widths, depths, kernels and strides; got "
            f"{len(widths)}, {len(depths)}, {len(kernels)} and {len(strides)}"
        )
    for label, values, low in (
        ("widths", widths, 1),
        ("depths", depths, 1),
        ("strides", strides, 1),
    ):
        if any(int(v) < low for v in values):
            raise ValueError(f"resnet_flex {label} must be >= {low}, got {list(values)}")
    if any(k < 1 or k % 2 == 0 for k in kernels):
        raise ValueError(f"resnet_flex kernels must be odd, got {list(kernels)}")
    for label, values in (("expansions", expansions), ("skips", skips)):
        if values and len(values) != len(widths):
            raise ValueError(f"resnet_flex {label} needs one entry per stage, got {list(values)}")
    return FlexNet(num_classes, in_channels, widths, depths, kernels, strides, expansions, skips)
