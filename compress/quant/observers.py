"""Activation observers: what a calibration run records at each tensor point."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from slimline.compress.quant.spec import QuantSpec, affine_spec
from slimline.compress.quant.state import TensorPoint

__all__ = ["MinMaxObserver", "observe_points"]


class MinMaxObserver:
    """Running minimum and maximum of every tensor it is shown (per tensor)."""

    def __init__(self) -> None:
        self.minimum, self.maximum = float("inf"), float("-inf")
        self.count = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.minimum = min(self.minimum, float(x.min()))
        self.maximum = max(self.maximum, float(x.max()))
        self.count += 1

    def spec(self, bits: int, *, signed: bool, symmetric: bool) -> QuantSpec:
        """The grid covering the observed range (see :func:`affine_spec`)."""
        return affine_spec(self.minimum, self.maximum, bits, signed=signed, symmetric=symmetric)


def observe_points(
    model: nn.Module, points: Iterable[TensorPoint], calibration: torch.Tensor, batch_size: int
) -> dict[str, MinMaxObserver]:
    """Run ``calibration`` through ``model`` (in batches) and record each point's min/max, as
    the model computes it now (hooks attached before these run first)."""
    observers: dict[str, MinMaxObserver] = {}
    handles = []
    modules = dict(model.named_modules())
    for point in points:
        observer = observers[point.key] = MinMaxObserver()
        module = modules[point.module]
        if point.where == "input":
            handles.append(module.register_forward_pre_hook(_Record(observer, point)))
        else:
            handles.append(module.register_forward_hook(_Record(observer, point)))
    try:
        for start in range(0, len(calibration), batch_size):
            model(calibration[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return observers


class _Record:
    def __init__(self, observer: MinMaxObserver, point: TensorPoint):
        self.observer, self.point = observer, point

    def __call__(self, module: nn.Module, args: tuple[Any, ...], *output: Any) -> None:
        tensor = args[0] if self.point.where == "input" else output[0]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"cannot observe the {self.point}: it is {type(tensor).__name__}")
        self.observer.observe(tensor)
