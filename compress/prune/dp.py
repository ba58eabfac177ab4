"""Rate-distortion sparsity allocation by dynamic programming (Xu et al., ICCV 2023).

Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"
observe that the output distortion caused by pruning several layers is close to the *sum* of the
distortions each layer causes alone (their "additivity" property). Allocating per-layer
sparsities then becomes a multiple-choice knapsack problem::

    minimise   sum_l  D[l, k_l]
    subject to sum_l  C[l, k_l] <= budget,        k_l in {0, ..., K-1}

which a dynamic programme over the budget solves exactly (their DP). ``D[l, k]`` is the
distortion when only layer ``l`` is pruned at level ``k``; ``C[l, k]`` is an integer cost of that
choice. The cost is whatever the budget is measured in: kept weights (unstructured pruning),
FLOPs, or latency. The DP only needs non-negative integers, so FLOPs may be passed as they are and
latency in integer microseconds, or any float cost can be mapped to a grid with
:func:`quantize_cost`, which rounds costs *up* and the budget *down* so that a solution that fits
on the grid never exceeds the real budget.

Budget semantics (exact, no off-by-one): a choice is feasible iff ``sum_l C[l, k_l] <= budget``.
The solver returns an optimal feasible choice; among equally good ones it takes the one with the
largest total cost (it uses as much of the budget as it can without gaining nothing).

``allocate_dp`` runs a numba kernel; :func:`allocate_dp_reference` is a pure-Python transcription
of the same recurrence for tests and benchmarks.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# The DP table has (layers x (budget + 1)) float64 cells. Past this many the caller should put the
# cost on a coarser grid (see quantize_cost) instead of allocating gigabytes.
MAX_TABLE_CELLS = 200_000_000


def _validate(
    distortion: np.ndarray, cost: np.ndarray, budget: int
) -> tuple[np.ndarray, np.ndarray, int]:
    distortion = np.asarray(distortion, dtype=np.float64)
    cost_in = np.asarray(cost)
    if distortion.ndim != 2 or distortion.shape[0] == 0 or distortion.shape[1] == 0:
        raise ValueError(
            f"distortion must be a non-empty (layers, levels) array, got shape {distortion.shape}"
        )
    if cost_in.shape != distortion.shape:
        raise ValueError(
            f"cost shape {cost_in.shape} differs from distortion shape {distortion.shape}"
        )
    if not np.issubdtype(cost_in.dtype, np.integer):
        raise ValueError(
            f"cost must be integers (got dtype {cost_in.dtype}); put float costs "
            "such as FLOPs or latency on a grid with quantize_cost()"
        )
    if np.isnan(distortion).any() or np.isneginf(distortion).any():
        raise ValueError("distortion contains NaN or -inf (+inf marks a forbidden level)")
    cost_arr = cost_in.astype(np.int64)
    if (cost_arr < 0).any():
        raise ValueError("cost must be non-negative")
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer, got {budget!r}")
    budget = int(budget)
    allowed = np.where(np.isfinite(distortion), cost_arr, np.iinfo(np.int64).max)
    cheapest = allowed.min(axis=1)
    if (cheapest == np.iinfo(np.int64).max).any():
        layer = int(np.argmax(cheapest == np.iinfo(np.int64).max))
        raise ValueError(f"layer {layer} has no level with finite distortion")
    if int(cheapest.sum()) > budget:
        raise ValueError(
            f"budget {budget} cannot be met: the cheapest choice in every layer "
            f"already costs {int(cheapest.sum())}"
        )
    return distortion, cost_arr, budget


def allocate_dp(distortion: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """One level per layer minimising summed distortion under a cost budget (Xu et al.'s DP).

    Args:
        distortion: ``(L, K)`` float, ``distortion[l, k]`` = output distortion when only layer ``l``
            is pruned at level ``k``; ``+inf`` forbids a level.
        cost: ``(L, K)`` int64, what level ``k`` of layer ``l`` costs (kept weights, FLOPs,
            integer microseconds, or grid units from :func:`quantize_cost`).
        budget: the largest allowed total cost (inclusive).

    Returns:
        ``(L,)`` int64 level index per layer with ``sum_l cost[l, idx[l]] <= budget`` and the least
        ``sum_l distortion[l, idx[l]]``.

    Raises:
        ValueError: malformed inputs, or even the cheapest choice exceeds ``budget``.
    """
    distortion, cost, budget = _validate(distortion, cost, budget)
    cost, budget, scale = _reduce_by_gcd(cost, budget)
    span = _reachable_span(cost, budget)
    if cost.shape[0] * (span + 1) > MAX_TABLE_CELLS:
        raise ValueError(
            f"budget {budget * scale} needs a DP table of {cost.shape[0]} x "
            f"{span + 1} cells; put the cost on a coarser grid with quantize_cost()"
        )
    return _dp_kernel(distortion, cost, budget)


def _reduce_by_gcd(cost: np.ndarray, budget: int) -> tuple[np.ndarray, int, int]:
    """Divide costs by their common divisor: an exact reduction that shrinks the DP table."""
    g = int(np.gcd.reduce(cost.ravel())) if cost.any() else 1
    if g <= 1:
        return cost, budget, 1
    return cost // g, budget // g, g  # floor(budget/g) keeps exactly the same feasible set


def _reachable_span(cost: np.ndarray, budget: int) -> int:
    """Width of the budget axis the kernel actually touches."""
    return int(min(budget, cost.max(axis=1).sum()) - cost.min(axis=1).sum())


@numba.njit(cache=True, nogil=True)
def _dp_kernel(distortion: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """Exact-cost DP recurrence ``f_l(b) = min_k f_{l-1}(b - C[l,k]) + D[l,k]`` (Xu et al.).

    ``f_l(b)`` is the least distortion of layers ``0..l`` whose costs sum to exactly ``b``. The
    budget axis is offset by the cheapest prefix cost and clipped to what later layers leave,
    so only reachable cells are visited. The table keeps every layer's row so the choice is
    recovered by re-evaluating the same sums (bit-identical), which keeps the inner loop a
    branch-free ``min`` that LLVM vectorises.
    """
    n_layers, n_levels = distortion.shape
    low_cost = np.empty(n_layers, np.int64)
    high_cost = np.empty(n_layers, np.int64)
    for layer in range(n_layers):
        low, high = np.iinfo(np.int64).max, np.int64(0)
        for k in range(n_levels):
            if distortion[layer, k] < np.inf:  # +inf levels are forbidden
                low = min(low, cost[layer, k])
                high = max(high, cost[layer, k])
        low_cost[layer], high_cost[layer] = low, high
    # Prefix bounds: after layer l the exact cost lies in [lo[l], hi[l]].
    suffix_low = np.zeros(n_layers + 1, np.int64)
    for layer in range(n_layers - 1, -1, -1):
        suffix_low[layer] = suffix_low[layer + 1] + low_cost[layer]
    lo = np.empty(n_layers, np.int64)
    hi = np.empty(n_layers, np.int64)
    run_low, run_high = 0, 0
    for layer in range(n_layers):
        run_low += low_cost[layer]
        run_high += high_cost[layer]
        lo[layer] = run_low
        hi[layer] = min(run_high, budget - suffix_low[layer + 1])
    base = lo[0]
    width = hi[n_layers - 1] - lo[n_layers - 1] + 1
    for layer in range(n_layers):
        width = max(width, hi[layer] - lo[layer] + 1)
    table = np.full((n_layers, width), np.inf)
    # Row l, column j  <->  exact cost lo[l] + j.
    for k in range(n_levels):
        c = cost[0, k]
        if lo[0] <= c <= hi[0] and distortion[0, k] < table[0, c - base]:
            table[0, c - base] = distortion[0, k]
    for layer in range(1, n_layers):
        prev_lo, prev_hi = lo[layer - 1], hi[layer - 1]
        row_lo, row_hi = lo[layer], hi[layer]
        prev = table[layer - 1]
        row = table[layer]
        for k in range(n_levels):
            d = distortion[layer, k]
            if not d < np.inf:
                continue
            c = cost[layer, k]
            start = max(row_lo, prev_lo + c)
            stop = min(row_hi, prev_hi + c)
            if stop < start:
                continue
            # Aligned slices instead of prev[j + shift]: numba's negative-index wraparound
            # check on a computed index blocks SIMD vectorisation (about 10x slower).
            dst = row[start - row_lo : stop - row_lo + 1]
            src = prev[start - c - prev_lo : stop - c - prev_lo + 1]
            for j in range(dst.shape[0]):
                v = src[j] + d
                if v < dst[j]:
                    dst[j] = v
    # Best final cell; ties go to the larger total cost.
    last = n_layers - 1
    best_j, best = -1, np.inf
    for j in range(hi[last] - lo[last], -1, -1):
        if table[last, j] < best:
            best, best_j = table[last, j], j
    choice = np.empty(n_layers, np.int64)
    b = lo[last] + best_j
    for layer in range(n_layers - 1, -1, -1):
        target = table[layer, b - lo[layer]]
        found = -1
        for k in range(n_levels):
            d = distortion[layer, k]
            if not d < np.inf:
                continue
            c = cost[layer, k]
            if layer == 0:
                if c == b and d == target:
                    found = k
                    break
            else:
                j = b - c - lo[layer - 1]
                if 0 <= j <= hi[layer - 1] - lo[layer - 1] and table[layer - 1, j] + d == target:
                    found = k
                    break
        choice[layer] = found
        b -= cost[layer, found]
    return choice


def allocate_dp_reference(distortion: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """Pure-Python :func:`allocate_dp` (same recurrence, dictionaries over reachable costs).

    Slow; for tests and for the numba-vs-Python benchmark.
    """
    distortion, cost, budget = _validate(distortion, cost, budget)
    n_layers, n_levels = distortion.shape
    d_rows = distortion.tolist()
    c_rows = cost.tolist()
    suffix_low = [0] * (n_layers + 1)
    for layer in range(n_layers - 1, -1, -1):
        finite = [c for c, d in zip(c_rows[layer], d_rows[layer]) if d < math.inf]
        suffix_low[layer] = suffix_low[layer + 1] + min(finite)
    # rows[l][b] = least distortion of the first l layers with exact total cost b
    rows: list[dict[int, float]] = [{0: 0.0}]
    for layer in range(n_layers):
        limit = budget - suffix_low[layer + 1]
        row: dict[int, float] = {}
        for b_prev, f_prev in rows[-1].items():
            for k in range(n_levels):
                d = d_rows[layer][k]
                if not d < math.inf:
                    continue
                b = b_prev + c_rows[layer][k]
                if b > limit:
                    continue
                v = f_prev + d
                if v < row.get(b, math.inf):
                    row[b] = v
        rows.append(row)
    final = rows[-1]
    b = max(final, key=lambda key: (-final[key], key))  # least distortion, then largest cost
    choice = [0] * n_layers
    for layer in range(n_layers - 1, -1, -1):
        target = rows[layer + 1][b]
        for k in range(n_levels):
            d = d_rows[layer][k]
            b_prev = b - c_rows[layer][k]
            if d < math.inf and b_prev in rows[layer] and rows[layer][b_prev] + d == target:
                choice[layer] = k
                b = b_prev
                break
    return np.asarray(choice, dtype=np.int64)


def quantize_cost(cost: np.ndarray, budget: float, steps: int = 10_000) -> tuple[np.ndarray, int]:
    """Map a non-negative real cost (FLOPs, latency in ms, weights) to an integer grid.

    The grid unit is ``budget / steps``. Costs are rounded **up** and the budget **down**, so any
    choice feasible on the grid is feasible in the original units:
    ``sum ceil(c/u) * u >= sum c`` and ``sum ceil(c/u) <= floor(B/u)`` imply ``sum c <= B``.
    The price is at most one unit per layer of unused budget (the DP may leave up to ``L * u``
    on the table). Returns ``(grid_cost int64, grid_budget)``.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if budget <= 0 or steps < 1:
        raise ValueError(f"budget and steps must be positive, got {budget} and {steps}")
    if not np.isfinite(cost).all() or (cost < 0).any():
        raise ValueError("cost must be finite and non-negative")
    # Float noise can only push a cost one unit *up* here, which is the safe direction.
    grid = np.ceil(cost * (steps / budget)).astype(np.int64)
    return grid, int(steps)
