"""Importable helpers shared by tests: targets of the ``factory: package.module:function`` hooks
and a tiny search space."""

from __future__ import annotations

import torch
import torch.nn as nn


def xy_dataset(n: int = 100):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 5, generator=generator), torch.arange(n) % 4


def bad_dataset():
    return "not tensors"


def tiny_net(num_classes: int = 10, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_module():
    return 42


class _Inverse(nn.Module):
    def forward(self, x):
        return torch.linalg.inv(x)


class NoOnnxOp(nn.Module):
    """A model with an op (matrix inverse) that no ONNX exporter converts."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.proj = nn.Linear(64, 16)
        self.inverse = _Inverse()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.proj(x.flatten(1)).view(-1, 4, 4) + 4 * torch.eye(4)
        return self.head(self.inverse(h).flatten(1))


def no_onnx_op(num_classes: int = 10) -> nn.Module:
    return NoOnnxOp(num_classes)


# A two-stage CNN search space small enough to search in seconds (test_search_*.py).
TINY_SPACE = {
    "name": "tiny",
    "input_shape": [1, 8, 8],
    "num_classes": 10,
    "stages": [
        {"widths": [4, 8], "depths": [1], "kernels": [3], "stride": 1},
        {"widths": [8, 16], "depths": [1, 2], "kernels": [3], "stride": 2},
    ],
}
