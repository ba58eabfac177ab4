"""Rate-distortion pruning end to end: curves -> DP -> optional refinement around the solution.

:func:`rd_allocation` is Xu et al. (ICCV 2023): measure every layer's distortion curve with the
rest of the model dense, then solve ``min sum_l delta_l(phi_l)`` under the weight budget with the
DP of :mod:`slimline.compress.prune.dp`.

Additivity around the *dense* model degrades as the pruned model drifts from it (high sparsity,
strongly coupled layers). ``refine`` rounds therefore re-measure the curves *conditionally* —
each layer swept while every other layer stays at the current allocation — and solve the DP
again; the expansion is now around a nearby point, so it is far more accurate. A round is only
accepted if the measured joint distortion drops (otherwise the window halves), and only levels
within ``window`` of each layer's current fraction are measured (a trust region, and about 5x
fewer forwards than the first curves at the defaults).
This refinement is our addition; ``refine=0`` is the paper's one-shot method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn

from slimline.compress.prune.allocation import dp_allocation
from slimline.compress.prune.distortion import DistortionCurves, distortion_curves, joint_distortion


@dataclass
class RDResult:
    """Pruned count per layer, the distortion measured for it on the distortion inputs, what the
    dense-model curves predicted for the first DP solution, and what each round did."""

    counts: dict[str, int]
    measured: float
    predicted: float
    curves: DistortionCurves
    rounds: list[dict[str, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def rd_allocation(
    model: nn.Module,
    names: Sequence[str],
    inputs: torch.Tensor,
    budget: int,
    *,
    levels: Sequence[float],
    reduction: str = "mean",
    refine: int = 3,
    window: float = 0.1,
    max_level: float = 1.0,
    curves: DistortionCurves | None = None,
    progress: Callable[[int], None] | None = None,
) -> RDResult:
    """Per-layer pruned counts keeping at most (exactly, when possible) ``budget`` weights.

    ``curves`` may be passed in when several budgets share one model (they do not depend on the
    budget). Levels above ``max_level`` are never chosen (``0.99`` keeps at least 1% of every
    layer: an emptied layer cuts a plain chain of layers, and fine-tuning cannot bring it back).
    The model's weights are unchanged on return.
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    levels_arr = np.asarray(levels, dtype=np.float64)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if curves is None:
        curves = distortion_curves(
            model, names, inputs, levels_arr, reduction=reduction, progress=progress
        )
    elif list(curves.names) != list(names) or not np.array_equal(curves.levels, levels_arr):
        raise ValueError("the given curves were measured for other layers or levels")
    seconds["curves"] = time.perf_counter() - started
    allowed = levels_arr <= max_level + 1e-12
    if not allowed.any():
        raise ValueError(f"no grid level is <= max_level={max_level}")
    started = time.perf_counter()
    allocation = dp_allocation(_forbid(curves, allowed), budget)
    seconds["dp"] = time.perf_counter() - started
    counts = allocation.counts
    reference = _reference(model, inputs)
    measured = joint_distortion(model, counts, inputs, reference=reference, reduction=reduction)
    rounds = [{"round": 0, "measured": measured, "accepted": True}]
    started = time.perf_counter()
    for round_index in range(1, refine + 1):
        fraction = np.array([counts[n] / curves.numel[i] for i, n in enumerate(names)])
        nearby = (np.abs(levels_arr[None, :] - fraction[:, None]) <= window + 1e-9) & allowed
        conditional = distortion_curves(
            model,
            names,
            inputs,
            levels_arr,
            reduction=reduction,
            base_counts=counts,
            measure=nearby,
        )
        try:
            candidate = dp_allocation(conditional, budget).counts
        except ValueError:
            break  # the window holds no allocation within budget: keep what we have
        value = joint_distortion(model, candidate, inputs, reference=reference, reduction=reduction)
        accepted = value < measured
        rounds.append(
            {"round": round_index, "measured": value, "accepted": accepted, "window": window}
        )
        if accepted:
            counts, measured = candidate, value
        else:
            window /= 2  # the expansion overreached: try a smaller step
    seconds["refine"] = time.perf_counter() - started
    return RDResult(counts, measured, allocation.predicted, curves, rounds, seconds)


def _forbid(curves: DistortionCurves, allowed: np.ndarray) -> DistortionCurves:
    """The curves with the levels outside ``allowed`` set to +inf (the DP skips them)."""
    if allowed.all():
        return curves
    distortion = np.where(allowed[None, :], curves.distortion, np.inf)
    return replace(curves, distortion=distortion)


@torch.no_grad()
def _reference(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(inputs)
    finally:
        model.train(was_training)
