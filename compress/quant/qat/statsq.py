"""StatsQ: statistical weight quantization (Liu et al., ICML 2023, "Oscillation-free
Quantization for Low-bit Vision Transformers", sec. 4.1).

The scale is a statistic of the weights, recomputed every forward and never learned — a learned
scale was what drove oscillation — and the levels have no zero:

    s = 2 · mean|w_row|  (per output row),   n = 2^(b-1)
    q = s · (round(clamp(w / s, -1, 1) · n - 1/2) + 1/2) / n

i.e. ``2^b`` levels ``s·(k + 1/2)/n`` for integers ``k ∈ [-n, n-1]`` (the integer is clamped to
that range too: at ``w = s`` the rounding would otherwise produce ``k = n``). The gradient is
straight-through (identity, also outside ``[-s, s]``, as in the authors' public code) and ``s``
is detached (a statistic).

Export: the levels are half-integers times ``s/n``, so on an integer grid with
``scale = s / (2n)`` they are the odd integers ``2k + 1 ∈ [-(2n-1), 2n-1]`` — exact, and inside
a narrow signed ``(b+1)``-bit grid (stored as int8 up to ``b = 7``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimline.compress.quant.spec import QuantSpec

__all__ = [
    "StatsQQuantizer",
    "statsq_integer_levels",
    "statsq_quantize",
    "statsq_scale",
    "statsq_spec",
]


def statsq_scale(weight: torch.Tensor) -> torch.Tensor:
    """``s = 2 · mean|w|`` of every output row, shaped to broadcast over ``weight``."""
    scale = 2 * weight.detach().abs().flatten(1).mean(1).clamp_min(1e-12)
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def statsq_integer_levels(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Integers ``k ∈ [-n, n-1]`` with ``q = s (k + 1/2) / n``."""
    n = 2 ** (bits - 1)
    scale = statsq_scale(weight) if scale is None else scale
    unit = torch.clamp(weight.detach() / scale, -1, 1)
    return torch.clamp(torch.round(unit * n - 0.5), -n, n - 1)


def statsq_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized ``weight`` (module docstring), gradient straight through (identity)."""
    n = 2 ** (bits - 1)
    scale = statsq_scale(weight)
    levels = statsq_integer_levels(weight, bits, scale)
    quantized = scale * (levels + 0.5) / n
    return weight + (quantized - weight).detach()


def statsq_spec(weight: torch.Tensor, bits: int) -> tuple[QuantSpec, torch.Tensor]:
    """The exact integer grid of StatsQ's levels (scale ``s/(2n)``, odd integers ``2k+1``) and
    the weight on it. Needs ``bits <= 7`` so ``2n - 1 <= 127`` fits int8."""
    if not 2 <= bits <= 7:
        raise ValueError(f"StatsQ export needs 2 <= bits <= 7, got {bits}")
    n = 2 ** (bits - 1)
    scale = statsq_scale(weight)
    levels = statsq_integer_levels(weight, bits, scale)
    spec = QuantSpec(
        bits=bits + 1,
        signed=True,
        narrow=True,
        axis=0,
        scale=(scale / (2 * n)).flatten(),
        zero_point=torch.zeros(weight.shape[0], dtype=torch.int32),
    )
    return spec, spec.dequantize(2 * levels + 1)


class StatsQQuantizer(nn.Module):
    """StatsQ as a module (no parameters); used as a weight parametrization."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return statsq_quantize(weight, self.bits)

    def integer_levels(self, weight: torch.Tensor) -> torch.Tensor:
        return statsq_integer_levels(weight, self.bits)
