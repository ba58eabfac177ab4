"""Weight oscillation in QAT, measured as in Nagel et al., ICML 2022 ("Overcoming Oscillations
in Quantization-Aware Training", sec. 3.2 / eq. 5-6).

A weight *oscillates* at a step when its integer level changes in the direction opposite to its
previous change. Each weight keeps an exponential moving frequency
``f ← m · o_t + (1 - m) · f`` of those events; the reported figure is the share of weights whose
frequency exceeds ``threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["OscillationTracker"]


@dataclass
class _State:
    level: torch.Tensor
    direction: torch.Tensor  # sign of the last level change (0: none yet)
    frequency: torch.Tensor


@dataclass
class OscillationTracker:
    """Follows the integer levels of named tensors; call :meth:`update` after every step."""

    momentum: float = 0.01
    threshold: float = 0.005
    states: dict[str, _State] = field(default_factory=dict)

    @torch.no_grad()
    def update(self, name: str, levels: torch.Tensor) -> torch.Tensor:
        """Record ``levels`` for ``name``; returns the boolean oscillation events of this step."""
        levels = levels.detach().to(torch.float32)
        state = self.states.get(name)
        if state is None or state.level.shape != levels.shape:
            zeros = torch.zeros_like(levels)
            self.states[name] = _State(levels.clone(), zeros.clone(), zeros.clone())
            return torch.zeros_like(levels, dtype=torch.bool)
        change = torch.sign(levels - state.level)
        events = (change != 0) & (change == -state.direction)
        state.frequency.mul_(1 - self.momentum).add_(events.float(), alpha=self.momentum)
        state.direction = torch.where(change != 0, change, state.direction)
        state.level = levels.clone()
        return events

    def share(self) -> float:
        """Fraction of all tracked weights whose frequency is above ``threshold``."""
        total = sum(s.frequency.numel() for s in self.states.values())
        above = sum(int((s.frequency > self.threshold).sum()) for s in self.states.values())
        return above / total if total else 0.0
