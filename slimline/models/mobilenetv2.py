"""MobileNetV2-style network (Sandler et al., 2018) scaled down for tiny inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


def _make_divisible(value: float, divisor: int = 8) -> int:
    # As in the reference MobileNetV2: round to a multiple of 8 (SIMD-friendly), never dropping
    # more than 10% of the requested channels.
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> linear 1x1 project, with a residual add when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: float):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:  # an expansion to the same width would be a wasted 1x1 conv
            layers += [*_conv_bn(in_channels, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        # No activation after the projection: the paper's "linear bottleneck".
        layers += _conv_bn(hidden, out_channels, 1)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width_mult: float,
        expand_ratio: float,
        channels: Sequence[int],
        blocks: Sequence[int],
        strides: Sequence[int],
    ):
        super().__init__()
        widths = [_make_divisible(c * width_mult) for c in channels]
        # Stride-1 stem: the ImageNet stride-2 stem would leave 4x4 maps from 8x8 digits.
        layers: list[nn.Module] = [*_conv_bn(in_channels, widths[0], 3), nn.ReLU6()]
        cin = widths[0]
        for cout, n, stride in zip(widths, blocks, strides, strict=True):
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand_ratio))
                cin = cout
        # The reference widens to 1280 here; 4x the last stage keeps the head proportionate.
        last = _make_divisible(4 * widths[-1])
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("mobilenetv2")
def mobilenetv2(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (8, 8),
    width_mult: float = 1.0,
    expand_ratio: float = 4,
    channels: Sequence[int] = (16, 24, 32),
    blocks: Sequence[int] = (1, 2, 2),
    strides: Sequence[int] = (1, 2, 2),
) -> nn.Module:
    """MobileNetV2-style net: inverted residuals with depthwise 3x3 convs, ReLU6, linear bottleneck."""
    if len(tuple(input_size)) != 2:
        raise ValueError(f"mobilenetv2 expects input_size=(H, W), got {input_size!r}")
    if not len(channels) == len(blocks) == len(strides) > 0:
        raise ValueError(
            "mobilenetv2 channels, blocks and strides must be non-empty and of equal length, got "
            f"{tuple(channels)}, {tuple(blocks)}, {tuple(strides)}"
        )
    if width_mult <= 0 or expand_ratio < 1:
        raise ValueError(
            f"mobilenetv2 needs width_mult > 0 and expand_ratio >= 1, got {width_mult}, {expand_ratio}"
        )
    return MobileNetV2(
        num_classes,
        in_channels,
        width_mult,
        expand_ratio,
        tuple(channels),
        tuple(blocks),
        tuple(strides),
    )
