"""Importable helpers for tests of the ``factory: package.module:function`` hooks."""

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
