"""CIFAR-style ResNet (He et al., 2016, section 4.2): three stages of BasicBlocks, depth = 6n + 2."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


class BasicBlock(nn.Module):
    """Two conv+BN layers (3x3 by default) with a residual add; a 1x1 conv+BN shortcut when the
    shape changes. ``kernel``, ``expansion`` (inner width / output width) and ``skip`` (the
    residual on or off) serve the search space's ``resnet_flex`` family."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel: int = 3,
                 expansion: float = 1.0, skip: bool = True):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (same padding), got {kernel}")
        if expansion <= 0:
            raise ValueError(f"expansion must be positive, got {expansion}")
        padding = kernel // 2
        # ``expansion`` widens (or narrows) the inner conv: out_channels * expansion channels.
        hidden = max(1, round(out_channels * expansion))
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel, stride, padding, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, out_channels, kernel, 1, padding, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Separate, out-of-place ReLUs: hooks and quantization observers see each activation once,
        # and a hook that keeps a BN output does not see it rewritten by the ReLU.
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        # Identity shortcut keeps the block cheap; only projection shortcuts carry parameters.
        self.skip = skip
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x) if self.skip else out)


class ResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, blocks_per_stage: int, width: int):
        super().__init__()
        # 3x3 stride-1 stem (not ImageNet's 7x7/2 + maxpool), which would erase 8x8 inputs.
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, channels = [], width
        for i, out_channels in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(channels, out_channels, stride)]
            blocks += [BasicBlock(out_channels, out_channels) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet")
def resnet(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (8, 8),
    depth: int = 8,
    width: int = 16,
) -> nn.Module:
    """CIFAR-style ResNet with BasicBlocks; depth = 6n+2 (8, 14, 20, ...), widths w, 2w, 4w."""
    # Global pooling makes any (H, W) work; only the rank is checked.
    if len(tuple(input_size)) != 2:
        raise ValueError(f"resnet expects input_size=(H, W), got {input_size!r}")
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    if width < 1:
        raise ValueError(f"resnet width must be positive, got {width}")
    return ResNet(num_classes, in_channels, (depth - 2) // 6, width)


@register_model("resnet20")
def resnet20(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (8, 8),
    width: int = 16,
) -> nn.Module:
    """ResNet-20 (CIFAR-style, three BasicBlocks per stage)."""
    return resnet(
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        depth=20,
        width=width,
    )
