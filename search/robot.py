"""RoBoT: combine training-free proxies with Bayesian-optimised weights, then exploit greedily.

He et al., "Robustifying and Boosting Training-Free Neural Architecture Search", ICLR 2024.
No single zero-cost proxy ranks architectures well on every task, so RoBoT searches a weight
vector ``w`` in ``[-1, 1]^M`` over ``M`` min-max-normalised proxies (their Sec. 4.1)::

    s_w(a) = sum_m w_m * p~_m(a)                                  (combined score)
    f(w)   = objective(argmax_a s_w(a))                           (one query per new arch)

Stage 1 (exploration) lets a Bayesian optimiser propose ``w`` for ``T - 1`` rounds; proposals
whose argmax was already queried cost nothing (the query is cached per architecture), so only
``T0 <= T - 1`` architectures are actually evaluated. Stage 2 (exploitation, their "greedy
search") walks the ranking of the best ``w`` found and queries unseen architectures until
``T`` have been evaluated. The answer is the best *observed* architecture.

The objective is whatever ``query(index)`` returns (a short training's validation accuracy
in the ``search.nas`` stage; a benchmark's recorded accuracy in ``bench/bench_robot.py``).
The optimiser is Optuna's (GP by default, TPE on request), seeded, in memory.

This module is pure NumPy + Optuna; it knows nothing about models. Baselines with the same
query budget live here too so the benchmark compares like with like.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import optuna

__all__ = [
    "SearchTrace",
    "combined_scores",
    "minmax_normalise",
    "proxy_greedy_search",
    "random_search",
    "robot_search",
]

Query = Callable[[int], float]


def minmax_normalise(scores: np.ndarray) -> np.ndarray:
    """Column-wise ``(x - min) / (max - min)`` of an ``(architectures, proxies)`` matrix.

    A proxy that is constant over the pool becomes all zeros (it cannot rank anything), and a
    NaN entry (a proxy that failed on that architecture) becomes 0, so it adds nothing to
    ``s_w`` (RoBoT's reference code skips NaNs the same way).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"expected an (architectures, proxies) matrix, got shape {scores.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        low = np.nanmin(scores, axis=0)
        span = np.nanmax(scores, axis=0) - low
    span = np.where(np.isfinite(span) & (span > 0), span, np.inf)
    normalised = (scores - np.nan_to_num(low)) / span
    return np.nan_to_num(normalised, nan=0.0, posinf=0.0, neginf=0.0)


def combined_scores(normalised: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``s_w(a) = sum_m w_m * p~_m(a)`` for every architecture (RoBoT's weighted combination)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (normalised.shape[1],):
        raise ValueError(f"need {normalised.shape[1]} weights, got {weights.shape}")
    return normalised @ weights


@dataclass
class SearchTrace:
    """What a search with a query budget did: the queried architectures (pool indices, in
    order, each once) and what each query returned."""

    queried: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    weights: list[float] | None = None   # RoBoT's best weight vector
    exploration_queries: int = 0          # RoBoT's T0

    @property
    def best(self) -> int:
        """Pool index of the best observed architecture (first one on ties)."""
        if not self.queried:
            raise ValueError("no architecture was queried")
        return self.queried[int(np.argmax(self.values))]

    def best_so_far(self) -> list[int]:
        """The incumbent after each query (for anytime plots)."""
        out, best, best_value = [], -1, -np.inf
        for index, value in zip(self.queried, self.values):
            if value > best_value:
                best, best_value = index, value
            out.append(best)
        return out


class _CachedQuery:
    def __init__(self, query: Query, trace: SearchTrace):
        self.query, self.trace, self.cache = query, trace, {}

    def __call__(self, index: int) -> float:
        if index not in self.cache:
            value = float(self.query(index))
            self.cache[index] = value
            self.trace.queried.append(index)
            self.trace.values.append(value)
        return self.cache[index]


def _sampler(kind: str, seed: int, rounds: int) -> optuna.samplers.BaseSampler:
    # Optuna's samplers start with 10 random trials by default, which would be the whole
    # exploration stage for the small budgets RoBoT targets; a quarter of it (at least 2)
    # seeds the model instead.
    startup = max(2, rounds // 4)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; use gp, tpe or random")


def robot_search(
    normalised: np.ndarray,
    query: Query,
    budget: int,
    *,
    proxy_names: Sequence[str] | None = None,
    sampler: Literal["gp", "tpe", "random"] = "gp",
    seed: int = 0,
    exploration_rounds: int | None = None,
) -> SearchTrace:
    """RoBoT over a pool of ``normalised`` proxy scores (``minmax_normalise`` output).

    ``query(i)`` evaluates pool architecture ``i`` (called at most once per index and at most
    ``budget`` times in all). ``exploration_rounds`` defaults to ``budget - 1`` BO proposals,
    as in the paper's Algorithm 1.
    """
    count, num_proxies = normalised.shape
    if budget < 1:
        raise ValueError(f"query budget must be at least 1, got {budget}")
    names = list(proxy_names or [f"proxy{m}" for m in range(num_proxies)])
    budget = min(budget, count)
    trace = SearchTrace()
    cached = _CachedQuery(query, trace)

    def objective(trial: optuna.Trial) -> float:
        weights = [trial.suggest_float(f"w[{name}]", -1.0, 1.0) for name in names]
        return cached(int(np.argmax(combined_scores(normalised, weights))))

    rounds = budget - 1 if exploration_rounds is None else exploration_rounds
    verbosity = optuna.logging.get_verbosity()
    # Per-trial INFO lines and the GP sampler's "no greenlet" notice would flood a search log.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(direction="maximize", sampler=_sampler(sampler, seed, rounds))
        for _ in range(rounds):
            if len(trace.queried) >= budget:
                break
            study.optimize(objective, n_trials=1)
    finally:
        optuna.logging.set_verbosity(verbosity)
    trace.exploration_queries = len(trace.queried)
    if study.trials:
        best_weights = [study.best_params[f"w[{name}]"] for name in names]
    else:  # budget 1: nothing to learn from, use the plain sum of proxies
        best_weights = [1.0] * num_proxies
    trace.weights = best_weights
    ranking = np.argsort(-combined_scores(normalised, best_weights), kind="stable")
    for index in ranking:
        if len(trace.queried) >= budget:
            break
        cached(int(index))
    return trace


def random_search(count: int, query: Query, budget: int, *, seed: int = 0) -> SearchTrace:
    """Query ``budget`` distinct pool architectures uniformly at random."""
    trace = SearchTrace()
    cached = _CachedQuery(query, trace)
    for index in np.random.default_rng(seed).permutation(count)[:budget]:
        cached(int(index))
    return trace


def proxy_greedy_search(scores: Sequence[float], query: Query, budget: int) -> SearchTrace:
    """Query the top-``budget`` architectures of one proxy (NaNs last): a single proxy given
    the same query budget as RoBoT."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    trace = SearchTrace()
    cached = _CachedQuery(query, trace)
    for index in np.argsort(-scores, kind="stable")[:budget]:
        cached(int(index))
    return trace
