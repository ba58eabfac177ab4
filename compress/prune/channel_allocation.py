"""How many units each channel group keeps: uniform, global ranking, or DP under a budget.

Every allocator picks one *level* (a kept count) per group from :func:`group_levels` - multiples
of ``round_to`` channels (plus the full width), never fewer than ``1 - max_group_ratio`` of the
group - and returns the kept counts. Budgets are measured by a :class:`CostModel`:

* ``channels``: kept channels summed over the prunable groups (a head counts ``head_dim``);
* ``flops``: the model's FLOPs, predicted exactly from the kept counts. A conv/linear layer costs
  ``F * r_out * r_in`` where ``r`` are the kept fractions of the groups that own its output and
  input channels (a depthwise conv only ``F * r``), attention matmuls scale with the kept heads,
  and everything no group touches is a constant.
* ``latency``: predicted onnxruntime latency from a per-layer table
  (:class:`slimline.export.layer_lut.LayerLatencyTable`, attached by
  :func:`slimline.compress.prune.layer_latency.attach_latency`): the fixed
  overhead plus each Conv/Linear layer's entry at its kept (input, output) widths.

``dp`` minimises the summed importance of the removed units (the distortion) under the budget with
:func:`slimline.compress.prune.dp.allocate_dp`. FLOPs are bilinear in the kept fractions of neighbouring
groups, so the DP sees each group's cost with its neighbours held at the current solution and is
re-solved from its own answer until that settles; the best feasible answer is kept, and a greedy
repair (drop the level with the least distortion per FLOP saved) guarantees the budget holds.
Latency is handled by the same machinery: a table entry depends on the kept widths of the groups
owning the layer's two sides, so it is linearised and repaired exactly like FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from slimline.compress.prune.channel_cost import CostModel
from slimline.compress.prune.channel_groups import (
    ChannelGroup,
    StructuredPruningError,
)

if TYPE_CHECKING:
    pass

Target = Literal["channels", "flops", "latency"]
Allocation = Literal["uniform", "global", "dp"]
DP_GRID_STEPS = 4000  # budget resolution of the FLOPs DP (1/4000 of the budget)


def group_levels(group: ChannelGroup, round_to: int, max_group_ratio: float) -> np.ndarray:
    """Allowed kept counts of a group, ascending; the last is the full size.

    Channels: multiples of ``round_to`` (heads ignore it: a head is already a block of
    ``head_dim`` channels). Never below ``ceil((1 - max_group_ratio) * size)`` nor 1 unit.
    """
    n = group.size
    floor = max(1, math.ceil((1.0 - max_group_ratio) * n - 1e-9))
    step = 1 if group.kind == "heads" else max(1, round_to)
    levels = [k for k in range(step, n, step) if k >= floor]
    return np.asarray([*levels, n], dtype=np.int64)


def _snap(levels: np.ndarray, kept: float) -> int:
    """The allowed level nearest ``kept`` (ties keep more)."""
    distance = np.abs(levels - kept)
    return int(levels[np.flatnonzero(distance == distance.min())[-1]])


def uniform_kept(levels: list[np.ndarray], sizes: list[int], ratio: float) -> list[int]:
    """Every group loses ``ratio`` of its units, snapped to its allowed levels."""
    return [_snap(lv, n - round(ratio * n)) for lv, n in zip(levels, sizes)]


def allocate(
    groups: list[ChannelGroup],
    scores: list[torch.Tensor],
    cost: CostModel,
    *,
    ratio: float,
    target: Target = "channels",
    method: Allocation = "uniform",
    round_to: int = 1,
    max_group_ratio: float = 0.9,
    distortion: np.ndarray | None = None,
) -> list[int]:
    """Kept units per group that remove ``ratio`` of the ``target`` quantity.

    ``uniform`` with ``target="channels"`` removes ``ratio`` of every group (rounded); all other
    combinations meet the budget ``kept <= (1 - ratio) * original`` as closely as the levels
    allow, and raise :class:`StructuredPruningError` when no allocation can meet it.
    ``distortion`` (``dp`` only) is a ``(groups, levels)`` table over :func:`group_levels`, e.g.
    :func:`~slimline.compress.prune.channel_distortion.output_distortion_table`; by default the summed
    scores of the removed units.
    """
    if not 0.0 <= ratio < 1.0:
        raise StructuredPruningError(f"ratio must be in [0, 1), got {ratio}")
    if not 0.0 < max_group_ratio < 1.0:
        raise StructuredPruningError(f"max_group_ratio must be in (0, 1), got {max_group_ratio}")
    levels = [group_levels(g, round_to, max_group_ratio) for g in groups]
    sizes = [g.size for g in groups]
    if ratio == 0.0:  # nothing to remove; a noisy latency table must not make this infeasible
        return list(sizes)
    if target == "channels" and method == "uniform":
        if ratio > max_group_ratio:
            raise StructuredPruningError(
                f"ratio {ratio} exceeds max_group_ratio "
                f"{max_group_ratio}: no group may lose that much"
            )
        return uniform_kept(levels, sizes, ratio)
    if target == "channels":
        total = cost.channels(sizes)
        budget, measure = (1.0 - ratio) * total, cost.channels
    elif target == "flops":
        total = cost.total_flops
        budget, measure = (1.0 - ratio) * total, cost.flops
    elif target == "latency":
        total = cost.latency(sizes)
        budget, measure = (1.0 - ratio) * total, cost.latency
    else:
        raise StructuredPruningError(
            f"unknown target {target!r}; use 'channels', 'flops' or 'latency'"
        )
    floor = measure([int(lv[0]) for lv in levels])
    if floor > budget + 1e-6:
        raise StructuredPruningError(
            f"cannot remove {ratio:.1%} of the {target}: pruning every group as far as allowed "
            f"(max_group_ratio={max_group_ratio}, round_to={round_to}) still keeps "
            f"{floor / total:.1%}; lower ratio, raise max_group_ratio or ignore fewer layers"
        )
    sorted_scores = [np.sort(s.double().numpy()) for s in scores]
    if method == "uniform":
        return _bisect_uniform(levels, sizes, measure, budget, max_group_ratio)
    if method == "global":
        return _global_ranking(levels, sizes, scores, measure, budget)
    if method == "dp":
        if distortion is None:
            distortion = _distortion_table(levels, sizes, sorted_scores)
        if target == "channels":
            return _dp_channels(levels, distortion, cost.widths, int(math.floor(budget)))
        start = _bisect_uniform(levels, sizes, measure, budget, max_group_ratio)
        group_cost = cost.group_latency if target == "latency" else cost.group_flops
        return _dp_linearised(levels, distortion, measure, group_cost, budget, start, target)
    raise StructuredPruningError(f"unknown allocation {method!r}; use uniform, global or dp")


def _bisect_uniform(levels, sizes, measure, budget, max_ratio) -> list[int]:
    """The smallest uniform ratio whose snapped allocation fits the budget."""
    low, high = 0.0, max_ratio
    best = uniform_kept(levels, sizes, high)
    if measure(best) > budget:  # snapping keeps the minimum levels; use them directly
        return [int(lv[0]) for lv in levels]
    for _ in range(40):
        mid = (low + high) / 2
        kept = uniform_kept(levels, sizes, mid)
        if measure(kept) <= budget:
            high, best = mid, kept
        else:
            low = mid
    return best


def _global_ranking(levels, sizes, scores, measure, budget) -> list[int]:
    """Remove the globally lowest-scoring units: the fewest that fit the budget."""
    owner = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])
    order = owner[np.argsort(torch.cat([s.double() for s in scores]).numpy(), kind="stable")]

    def kept_after(m: int) -> list[int]:
        removed = np.bincount(order[:m], minlength=len(sizes))
        return [_snap(lv, max(n - r, int(lv[0]))) for lv, n, r in zip(levels, sizes, removed)]

    low, high = 0, len(order)
    while low < high:  # removing more never costs more: binary search on the count
        mid = (low + high) // 2
        if measure(kept_after(mid)) <= budget:
            high = mid
        else:
            low = mid + 1
    return kept_after(low)


def _distortion_table(levels, sizes, sorted_scores) -> np.ndarray:
    """``D[g, j]`` = summed scores of the units group g loses at level j (+inf: no such level)."""
    width = max(len(lv) for lv in levels)
    table = np.full((len(levels), width), np.inf)
    for g, (lv, n, s) in enumerate(zip(levels, sizes, sorted_scores)):
        prefix = np.concatenate([[0.0], np.cumsum(s)])
        table[g, : len(lv)] = prefix[n - lv]
    return table


def _dp_channels(levels, distortion, widths, budget: int) -> list[int]:
    from slimline.compress.prune.dp import allocate_dp

    cost = np.zeros(distortion.shape, dtype=np.int64)
    for g, (lv, w) in enumerate(zip(levels, widths)):
        cost[g, : len(lv)] = lv * w
    choice = allocate_dp(distortion, cost, budget)
    return [int(lv[j]) for lv, j in zip(levels, choice)]


def _dp_linearised(
    levels,
    distortion,
    measure: Callable[[Sequence[int]], float],
    group_cost: Callable[[int, Sequence[int], np.ndarray], np.ndarray],
    budget: float,
    start: list[int],
    target: str,
    iterations: int = 8,
) -> list[int]:
    """DP under a cost that is not separable per group (FLOPs, latency): see the module doc."""
    from slimline.compress.prune.dp import allocate_dp, quantize_cost

    def total_distortion(kept: list[int]) -> float:
        return float(
            sum(
                distortion[g, int(np.searchsorted(lv, k))]
                for g, (lv, k) in enumerate(zip(levels, kept))
            )
        )

    current, best, best_d = list(start), list(start), total_distortion(start)
    seen: set[tuple[int, ...]] = {tuple(start)}
    for _ in range(iterations):
        rows = np.zeros(distortion.shape)
        for g, lv in enumerate(levels):
            rows[g, : len(lv)] = group_cost(g, current, lv.astype(np.float64))
            rows[g, len(lv) :] = rows[g, 0]  # forbidden padding levels: any finite cost
        now = np.array(
            [rows[g, int(np.searchsorted(lv, k))] for g, (lv, k) in enumerate(zip(levels, current))]
        )
        # Linearised: cost(k) ~ cost(current) + sum_g rows[g, k_g] - now[g].
        shift = rows.min(axis=1)
        room = budget - measure(current) + now.sum() - shift.sum()
        if room <= 0:
            break
        grid, grid_budget = quantize_cost(rows - shift[:, None], room, DP_GRID_STEPS)
        try:
            choice = allocate_dp(distortion, grid, grid_budget)
        except ValueError:
            break
        candidate = [int(lv[j]) for lv, j in zip(levels, choice)]
        if measure(candidate) <= budget:
            d = total_distortion(candidate)
            if d < best_d:
                best, best_d = candidate, d
        if tuple(candidate) in seen:
            break
        seen.add(tuple(candidate))
        current = candidate
    return _repair(best, levels, distortion, measure, budget, target)


def _repair(kept, levels, distortion, measure, budget: float, target: str) -> list[int]:
    """Step groups down one level, least distortion per cost saved first, until within budget."""
    kept = list(kept)
    while measure(kept) > budget:
        base, best, best_rate = measure(kept), None, np.inf
        for g, lv in enumerate(levels):
            j = int(np.searchsorted(lv, kept[g]))
            if j == 0:
                continue
            trial = kept[:g] + [int(lv[j - 1])] + kept[g + 1 :]
            saved = base - measure(trial)
            if saved > 0:
                rate = (distortion[g, j - 1] - distortion[g, j]) / saved
                if rate < best_rate:
                    best, best_rate = trial, rate
        if best is None:
            raise StructuredPruningError(f"no allocation meets the {target} budget")
        kept = best
    return kept
