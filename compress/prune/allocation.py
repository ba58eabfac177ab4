"""Sparsity allocation: how many weights each layer loses for a global target.

Every allocator returns ``{parameter name: number of weights pruned}``; :func:`masks_from_counts`
then removes that many lowest-scored weights per layer. The budget is counted in weights:

    budget (kept weights) = N - floor(sparsity * N)     N = total weights of the candidate layers

the same rounding as ``prune.magnitude``, so at equal ``sparsity`` every method zeroes exactly
the same number of weights (``uniform`` rounds per layer and may zero up to one weight per layer
fewer). Weights that earlier masks already removed count as pruned: they are zero, score
lowest, and no allocation brings them back.

* :func:`uniform_allocation` — every layer at ``sparsity``.
* :func:`threshold_allocation` — one global threshold on an importance score (global magnitude,
  LAMP, DIMAP; see :mod:`slimline.compress.prune.importance`).
* :func:`dp_allocation` — Xu et al.'s rate-distortion optimum over measured distortion curves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from slimline.compress.prune.distortion import DistortionCurves
from slimline.compress.prune.dp import MAX_TABLE_CELLS, allocate_dp, quantize_cost


def keep_budget(total: int, sparsity: float) -> int:
    """Kept weights allowed for ``sparsity`` of ``total``: ``total - floor(sparsity * total)``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return total - int(sparsity * total)


def _zeros(weight: torch.Tensor) -> int:
    return int((weight.detach() == 0).sum())


def uniform_allocation(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """``floor(sparsity * n_l)`` per layer (or its existing zeros, if more)."""
    keep_budget(1, sparsity)  # validates the range
    return {name: max(int(sparsity * w.numel()), _zeros(w)) for name, w in weights.items()}


def threshold_allocation(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """Prune the ``floor(sparsity * N)`` globally lowest scores (ties by position, in mapping
    order); returns how many fall in each layer."""
    total = sum(s.numel() for s in scores.values())
    num_pruned = total - keep_budget(total, sparsity)
    flat = torch.cat([s.detach().flatten().double() for s in scores.values()])
    pruned = torch.zeros(total, dtype=torch.bool)
    pruned[torch.argsort(flat, stable=True)[:num_pruned]] = True
    counts, offset = {}, 0
    for name, s in scores.items():
        counts[name] = int(pruned[offset : offset + s.numel()].sum())
        offset += s.numel()
    return counts


def masks_from_counts(
    scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) dropping the ``counts[name]`` lowest scores of each layer."""
    masks = {}
    for name, s in scores.items():
        count = counts[name]
        if not 0 <= count <= s.numel():
            raise ValueError(f"cannot prune {count} of {s.numel()} weights in {name!r}")
        keep = torch.ones(s.numel(), dtype=torch.bool)
        keep[torch.argsort(s.detach().flatten(), stable=True)[:count]] = False
        masks[name] = keep.view(s.shape)
    return masks


@dataclass
class DPAllocation:
    """The DP's choice: grid level per layer, the final pruned counts after the slack is handed
    out, and the distortion the curves predict for the grid choice (sum over layers)."""

    levels: np.ndarray  # (L,) grid index per layer
    counts: dict[str, int]
    predicted: float
    budget: int
    kept: int  # total kept weights; == budget unless every layer is already dense enough
    quantized: bool  # the DP ran on a coarser cost grid (see quantize_cost)


def dp_allocation(
    curves: DistortionCurves, budget: int, *, max_cells: int = 20_000_000
) -> DPAllocation:
    """Minimise the summed single-layer distortion with at most ``budget`` kept weights.

    Runs :func:`allocate_dp` on ``curves.kept`` exactly; when the table would exceed
    ``max_cells`` cells it runs on :func:`quantize_cost`'s grid instead (still never over
    budget). The grid levels leave ``budget - sum(kept)`` weights unused (less than the smallest
    level step of a layer in the exact case); :func:`fill_slack` hands them back to the layers
    whose distortion drops most per weight, so the result keeps exactly ``budget`` weights.
    """
    cost = curves.kept.astype(np.int64)
    quantized = False
    span = min(budget, int(cost.max(axis=1).sum())) - int(cost.min(axis=1).sum())
    if len(curves.names) * (span + 1) > min(max_cells, MAX_TABLE_CELLS):
        steps = max(1, min(max_cells, MAX_TABLE_CELLS) // len(curves.names) - 1)
        grid_cost, grid_budget = quantize_cost(cost, budget, steps)
        levels = allocate_dp(curves.distortion, grid_cost, grid_budget)
        quantized = True
    else:
        levels = allocate_dp(curves.distortion, cost, budget)
    rows = np.arange(len(curves.names))
    predicted = float(curves.distortion[rows, levels].sum())
    kept = fill_slack(curves, levels, budget)
    counts = {name: int(curves.numel[i] - kept[i]) for i, name in enumerate(curves.names)}
    return DPAllocation(levels, counts, predicted, budget, int(kept.sum()), quantized)


def fill_slack(curves: DistortionCurves, levels: np.ndarray, budget: int) -> np.ndarray:
    """Kept weights per layer after spending ``budget - sum(kept)`` on un-pruning weights.

    Greedy on the measured curves: repeatedly take the layer whose next denser grid level
    lowers distortion most per extra weight (``(D[k] - D[k-1]) / (kept[k-1] - kept[k])``) and
    move it there, or part of the way (any weight count, not just grid levels) when the slack
    is smaller than the step. Stops when no slack is left or every layer is at its densest level.
    """
    levels = np.asarray(levels, dtype=np.int64).copy()
    rows = np.arange(len(levels))
    kept = curves.kept[rows, levels].astype(np.int64)
    if kept.sum() > budget:
        raise ValueError(f"allocation keeps {int(kept.sum())} weights, over the budget {budget}")
    slack = budget - int(kept.sum())
    while slack > 0:
        best, best_rate = -1, -np.inf
        for layer in rows:
            denser = _next_denser(curves.kept[layer], levels[layer])
            if denser < 0:
                continue
            extra = int(curves.kept[layer, denser] - curves.kept[layer, levels[layer]])
            gain = curves.distortion[layer, levels[layer]] - curves.distortion[layer, denser]
            rate = gain / extra
            if rate > best_rate:
                best, best_rate = layer, rate
        if best < 0:
            break
        denser = _next_denser(curves.kept[best], levels[best])
        step = int(curves.kept[best, denser] - kept[best])
        if step <= slack:
            kept[best] = curves.kept[best, denser]
            levels[best] = denser
            slack -= step
        else:
            kept[best] += slack  # part of a step: magnitude pruning works at any count
            slack = 0
    return kept


def _next_denser(kept_row: np.ndarray, level: int) -> int:
    """Index of the nearest lower level that keeps more weights, or -1."""
    for k in range(level - 1, -1, -1):
        if kept_row[k] > kept_row[level]:
            return k
    return -1
