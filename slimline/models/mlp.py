"""Plain multilayer perceptron over the flattened input."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:  # skip no-op Dropout modules so exported graphs stay minimal
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("mlp")
def mlp(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (8, 8),
    hidden: Sequence[int] = (256, 128),
    dropout: float = 0.0,
) -> nn.Module:
    """MLP on the flattened input: Linear+ReLU per hidden size, then a Linear head."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp dropout must be in [0, 1), got {dropout}")
    # Any input rank works: the feature count is all of it, whatever the layout.
    in_features = in_channels * math.prod(int(s) for s in input_size)
    return MLP(in_features, tuple(hidden), num_classes, dropout)
