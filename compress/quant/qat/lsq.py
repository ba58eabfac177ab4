"""LSQ: learned step size quantization (Esser et al., ICLR 2020, "Learned Step Size
Quantization") — the baseline weight quantizer and the activation quantizer of ``quant.qat``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["LSQQuantizer", "lsq_quantize", "round_pass", "scale_gradient"]


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward."""
    return (x - x * factor).detach() + x * factor


def lsq_quantize(
    x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float
) -> torch.Tensor:
    """Eq. 1-2 of LSQ: ``v̂ = round(clamp(v / s, -Q_N, Q_P)) · s``; the step's gradient is
    scaled by ``g = 1 / sqrt(N · Q_P)`` (sec. 2.2) so it trains at the weights' pace."""
    step = scale_gradient(step, grad_scale)
    return round_pass(torch.clamp(x / step, qmin, qmax)) * step


class LSQQuantizer(nn.Module):
    """Signed LSQ with one learned step per output row (``per_row``) or per tensor.

    The step is initialised from the first tensor it sees (``2 · mean|v| / sqrt(Q_P)``, sec. 2.1)
    — for activations call it once on calibration data before training, so every process of a
    distributed run starts from the same step.
    """

    def __init__(self, bits: int, *, per_row: bool):
        super().__init__()
        self.bits, self.per_row = bits, per_row
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.step = nn.Parameter(torch.ones(1))
        self.initialized = False

    def positive_step(self) -> torch.Tensor:
        """The step as used: ``|s|`` floored, since an optimizer may push ``s`` through zero."""
        return self.step.abs().clamp_min(1e-8)

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        step = self.positive_step()
        return step.reshape(-1, *([1] * (x.dim() - 1))) if self.per_row else step

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean = x.detach().abs().flatten(1).mean(1) if self.per_row else x.detach().abs().mean()
        self.step.data = (2 * mean.reshape(-1) / math.sqrt(self.qmax)).clamp_min(1e-8)
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.initialize(x)
        numel = x[0].numel() if self.per_row else x.numel()
        grad_scale = 1.0 / math.sqrt(numel * self.qmax)
        return lsq_quantize(x, self._view(x), self.qmin, self.qmax, grad_scale)

    @torch.no_grad()
    def integer_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Integer level of every entry (what the oscillation tracker follows)."""
        return torch.round(torch.clamp(x / self._view(x), self.qmin, self.qmax))
