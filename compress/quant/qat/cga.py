"""CGA: confidence-guided annealing (Liu et al., ICML 2023, OFQ sec. 4.2).

In the final phase of QAT only weights whose continuous position is within ``boundary_range``
(in units of one quantization step) of a rounding boundary keep training; the confident ones —
firmly inside a level — are frozen, so they cannot oscillate. Freezing must survive the
optimizer (momentum and decoupled weight decay would move a weight whose gradient is zero), so
frozen entries are restored after every step rather than having their gradient zeroed.
"""

from __future__ import annotations

import torch

__all__ = ["FrozenWeights", "boundary_distance", "confident_mask"]


def boundary_distance(position: torch.Tensor) -> torch.Tensor:
    """Distance of a continuous level position (rounded to get the integer level) to the
    nearest rounding boundary ``k + 1/2``: 0 on a boundary, 1/2 at a level's centre."""
    return (0.5 - (position - torch.round(position)).abs()).abs()


def confident_mask(position: torch.Tensor, boundary_range: float) -> torch.Tensor:
    """True where a weight is farther than ``boundary_range`` from a boundary (frozen)."""
    return boundary_distance(position.detach()) > boundary_range


class FrozenWeights:
    """Holds chosen entries of parameters at fixed values (call :meth:`restore` after steps)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def freeze(self, name: str, parameter: torch.nn.Parameter, mask: torch.Tensor) -> None:
        self.entries[name] = (parameter, mask.clone(), parameter.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, mask, values in self.entries.values():
            parameter.data = torch.where(mask, values, parameter.data)

    def share(self) -> float:
        total = sum(m.numel() for _, m, _ in self.entries.values())
        return sum(int(m.sum()) for _, m, _ in self.entries.values()) / total if total else 0.0
