"""RoBoT: proxy normalisation, combination, the query budget, and its paper claim in miniature."""

from __future__ import annotations

import numpy as np
import pytest

from slimline.search.robot import (
    combined_scores,
    minmax_normalise,
    proxy_greedy_search,
    random_search,
    robot_search,
)


def test_minmax_normalise_by_hand():
    scores = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, np.nan], [2.0, 5.0, 4.0]])
    expected = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 1.0]])
    np.testing.assert_allclose(minmax_normalise(scores), expected)


def test_combined_scores_is_the_weighted_sum():
    normalised = np.array([[0.0, 1.0], [1.0, 0.5]])
    np.testing.assert_allclose(combined_scores(normalised, [0.5, -1.0]), [-1.0, 0.0])
    with pytest.raises(ValueError, match="need 2 weights"):
        combined_scores(normalised, [1.0])


def _pool(seed: int, count: int = 150):
    """A latent quality ``q``; proxy 0 tracks it, proxy 1 is *anti*-correlated (a proxy with
    the wrong sign for this task), proxy 2 is noise. The query observes ``q`` with a little
    noise; truth ranks by ``q``."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=count)
    proxies = np.stack(
        [
            quality + 0.8 * rng.normal(size=count),
            -quality + 0.3 * rng.normal(size=count),
            rng.normal(size=count),
        ],
        axis=1,
    )
    observed = quality + 0.05 * rng.normal(size=count)
    rank = np.argsort(np.argsort(-quality)) + 1  # 1 = best
    return proxies, observed, rank


def test_budget_is_respected_and_each_architecture_is_queried_once():
    proxies, observed, _ = _pool(0)
    calls: list[int] = []

    def query(i: int) -> float:
        calls.append(i)
        return float(observed[i])

    trace = robot_search(minmax_normalise(proxies), query, budget=8, seed=1, sampler="tpe")
    assert len(calls) == len(set(calls)) == 8 == len(trace.queried)
    assert trace.best == calls[int(np.argmax(observed[calls]))]
    assert 1 <= trace.exploration_queries <= 7
    assert len(trace.weights) == 3


def test_robot_beats_random_search_and_the_median_single_proxy():
    """RoBoT's claim (Sec. 5): under the same query budget, the BO-weighted combination finds a
    better architecture than random search and than a typical single proxy, because it learns
    to flip a proxy whose sign is wrong for the task."""
    robot_ranks, random_ranks, median_proxy_ranks = [], [], []
    for seed in range(6):
        proxies, observed, rank = _pool(seed)
        query = observed.item  # query(i) -> float(observed[i])
        budget = 10
        robot_ranks.append(rank[robot_search(minmax_normalise(proxies), query, budget,
                                             seed=seed).best])
        random_ranks.append(rank[random_search(len(observed), query, budget, seed=seed).best])
        per_proxy = [rank[proxy_greedy_search(proxies[:, m], query, budget).best]
                     for m in range(proxies.shape[1])]
        median_proxy_ranks.append(float(np.median(per_proxy)))
    assert np.mean(robot_ranks) < np.mean(random_ranks)
    assert np.mean(robot_ranks) < np.mean(median_proxy_ranks)
    assert np.mean(robot_ranks) <= 3.0


def test_baselines():
    observed = np.array([0.1, 0.9, 0.5, 0.3])
    trace = proxy_greedy_search([3.0, np.nan, 2.0, 1.0], lambda i: float(observed[i]), 2)
    assert trace.queried == [0, 2] and trace.best == 2
    trace = random_search(4, lambda i: float(observed[i]), 4, seed=0)
    assert sorted(trace.queried) == [0, 1, 2, 3] and trace.best == 1
    assert trace.best_so_far()[-1] == 1


# ---- the pool benchmark's bookkeeping (bench/bench_robot.py) ----------------------------------
class _FakePool:
    """What bench_robot.compare reads from a fixture: recorded accuracies per architecture."""

    def __init__(self, val, test):
        self.architectures = [{"val_accuracy": [v], "test_accuracy": [t]}
                              for v, t in zip(val, test)]

    def mean_accuracy(self, key):
        return [a[key][0] for a in self.architectures]


def test_truth_ranks_share_the_best_rank_on_ties():
    from bench.bench_robot import truth_ranks

    assert truth_ranks([0.5, 0.9, 0.5, 0.1]).tolist() == [2, 1, 2, 4]


def test_pool_benchmark_gives_every_method_the_same_budget():
    from bench.bench_robot import compare, ensemble_search
    from slimline.search.leaderboard import TableScores

    rng = np.random.default_rng(0)
    quality = rng.normal(size=200)
    val, test = quality + 0.1 * rng.normal(size=200), quality
    # snip tracks the truth, #params is noise: the ensemble must learn to leave #params.
    scores = {"params": list(rng.normal(size=200)),
              "snip": list(quality + 0.3 * rng.normal(size=200))}
    calls: list[int] = []

    def query(i: int) -> float:
        calls.append(i)
        return float(val[i])

    trace = ensemble_search(scores, query, 10, seed=0)
    assert len(calls) == len(set(calls)) == 10 == len(trace.queried)
    run = TableScores("fake", 0, 64, scores)
    result = compare(_FakePool(val, test), [run], budget=10, seeds=6)
    for method in ("robot", "random", "ensemble"):
        assert 1 <= result[method]["rank"] <= 200 and result[method]["regret"] >= 0
    assert result["best_proxy"] == "snip" and result["single"]["snip"]["rank"] <= 3
    # Fitted on 5 random queries, the ensemble switches to snip and beats #params' top-10.
    assert result["ensemble"]["rank"] < result["params"]["rank"]
