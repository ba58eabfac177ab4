"""Rate-distortion DP: exact optimum (vs brute force), exact budgets, clear errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from slimline.compress.prune.allocation import dp_allocation, fill_slack
from slimline.compress.prune.distortion import DistortionCurves
from slimline.compress.prune.dp import allocate_dp, allocate_dp_reference, quantize_cost


def _brute_force(distortion: np.ndarray, cost: np.ndarray, budget: int) -> float | None:
    rows = np.arange(distortion.shape[0])
    best = None
    for choice in itertools.product(range(distortion.shape[1]), repeat=distortion.shape[0]):
        index = np.array(choice)
        if cost[rows, index].sum() <= budget:
            value = distortion[rows, index].sum()
            if np.isfinite(value) and (best is None or value < best):
                best = value
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, levels = 3 + seed % 2, 11
    distortion = rng.random((layers, levels))
    cost = rng.integers(0, 40, (layers, levels))
    if seed % 3 == 0:
        distortion[rng.random((layers, levels)) < 0.2] = np.inf  # forbidden levels
    cheapest = np.where(np.isfinite(distortion), cost, 10**9).min(axis=1).sum()
    budget = int(rng.integers(cheapest, cost.max(axis=1).sum() + 1))
    best = _brute_force(distortion, cost, budget)
    rows = np.arange(layers)
    for solver in (allocate_dp, allocate_dp_reference):
        choice = solver(distortion, cost, budget)
        assert choice.shape == (layers,) and choice.dtype == np.int64
        assert cost[rows, choice].sum() <= budget
        assert distortion[rows, choice].sum() == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_monotone_curves_use_the_budget() -> None:
    # Distortion falls as more is kept: the optimum spends the whole budget when it can.
    cost = np.tile(np.arange(10, -1, -1), (4, 1)).astype(np.int64)  # level k keeps 10 - k
    distortion = np.tile(np.linspace(0.0, 1.0, 11) ** 2, (4, 1)) * [[1.0], [2.0], [3.0], [4.0]]
    for budget in range(0, 41):
        choice = allocate_dp(distortion, cost, budget)
        assert cost[np.arange(4), choice].sum() == budget


def test_common_divisor_and_large_costs_are_exact() -> None:
    rng = np.random.default_rng(0)
    distortion = rng.random((3, 6))
    cost = rng.integers(0, 20, (3, 6)) * 7_000  # gcd reduction keeps the table small
    budget = int(cost.max(axis=1).sum() // 2)
    choice = allocate_dp(distortion, cost, budget)
    assert cost[np.arange(3), choice].sum() <= budget
    assert distortion[np.arange(3), choice].sum() == pytest.approx(
        _brute_force(distortion, cost, budget)
    )


def test_bad_inputs_raise() -> None:
    distortion, cost = np.zeros((2, 3)), np.array([[5, 3, 1], [4, 2, 2]])
    with pytest.raises(ValueError, match="cannot be met.*costs 3"):
        allocate_dp(distortion, cost, 2)
    with pytest.raises(ValueError, match="integers"):
        allocate_dp(distortion, cost.astype(float), 10)
    with pytest.raises(ValueError, match="shape"):
        allocate_dp(distortion, cost[:, :2], 10)
    with pytest.raises(ValueError, match="NaN"):
        allocate_dp(np.full((2, 3), np.nan), cost, 10)
    with pytest.raises(ValueError, match="non-negative"):
        allocate_dp(distortion, -cost, 10)
    with pytest.raises(ValueError, match="no level with finite"):
        allocate_dp(np.array([[np.inf] * 3, [0.0] * 3]), cost, 10)
    with pytest.raises(ValueError, match="coarser grid"):
        allocate_dp(np.zeros((100, 2)), np.array([[0, 3_000_001 + i] for i in range(100)]), 10**9)


def test_quantized_cost_is_never_over_budget() -> None:
    rng = np.random.default_rng(1)
    real_cost = rng.random((6, 21)) * 1e6  # FLOPs, latency ... any non-negative real cost
    distortion = np.sort(rng.random((6, 21)), axis=1)[:, ::-1].copy()
    budget = float(real_cost.sum(axis=0).mean() / 21 * 6)
    grid_cost, grid_budget = quantize_cost(real_cost, budget, steps=1000)
    choice = allocate_dp(distortion, grid_cost, grid_budget)
    assert real_cost[np.arange(6), choice].sum() <= budget


def _curves(numel: list[int], levels: np.ndarray, rng: np.random.Generator) -> DistortionCurves:
    kept = np.array([[n - int(np.floor(f * n + 1e-9)) for f in levels] for n in numel])
    distortion = np.cumsum(rng.random((len(numel), len(levels))), axis=1)
    distortion -= distortion[:, :1]  # 0 at level 0, increasing with pruning
    return DistortionCurves(
        [f"l{i}" for i in range(len(numel))], levels, distortion, kept, np.array(numel)
    )


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77, 0.9])
def test_dp_allocation_keeps_exactly_the_budget(sparsity: float) -> None:
    rng = np.random.default_rng(2)
    numel = [1000, 37, 4608, 250]
    curves = _curves(numel, np.linspace(0, 1, 11), rng)
    total = sum(numel)
    budget = total - int(sparsity * total)
    for max_cells in (20_000_000, 500):  # exact table, and the quantised-cost fallback
        result = dp_allocation(curves, budget, max_cells=max_cells)
        kept = sum(n - result.counts[f"l{i}"] for i, n in enumerate(numel))
        assert kept == budget == result.kept
        assert result.quantized == (max_cells == 500)


def test_fill_slack_gives_weights_to_the_steepest_layer() -> None:
    levels = np.linspace(0, 1, 3)  # 0, 0.5, 1
    kept = np.array([[100, 50, 0], [100, 50, 0]])
    distortion = np.array([[0.0, 1.0, 5.0], [0.0, 3.0, 9.0]])
    curves = DistortionCurves(["a", "b"], levels, distortion, kept, np.array([100, 100]))
    result = fill_slack(curves, np.array([1, 1]), 120)  # 100 kept + 20 slack
    assert result.tolist() == [50, 70]  # b's distortion drops faster per weight
