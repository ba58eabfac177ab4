"""The ``robot`` strategy of ``search.nas``: RoBoT over a sampled pool, queried by short
training (validation accuracy after ``query_epochs`` epochs, one seeded run per architecture)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from slimline.search.robot import minmax_normalise, robot_search


def run_robot(setup: Any, data: Any, *, seed: int, progress: Callable[[int, str], Any]
              ) -> tuple[list[Any], Any, dict[str, Any]]:
    """Score the pool with every proxy, drop what breaks the limits, run RoBoT; returns
    (candidates, chosen, extra metrics). ``progress(total, desc)`` opens a progress bar."""
    from slimline.search.nas_ensemble import short_training_accuracy

    p = setup.params
    pool_archs = setup.space.sample(p.pool_size, seed=seed)
    candidates = []
    with progress(len(pool_archs), "proxies over the pool") as bar:
        for arch in pool_archs:
            candidates.append(setup.evaluator(arch))
            bar.update(1)
    pool = [c for c in candidates if setup.limits.feasible(c)]
    if not pool:
        return candidates, None, {}
    names = setup.evaluator.proxies
    matrix = np.array([[c.scores[name] for name in names] for c in pool], dtype=np.float64)
    queried_accuracy: dict[str, float] = {}
    bar = progress(min(p.query_budget, len(pool)), "short trainings")

    def query(index: int) -> float:
        value = short_training_accuracy(setup.space, pool[index].arch, data,
                                        p.query_epochs, seed)
        queried_accuracy[pool[index].digest] = value
        bar.update(1, val_acc=value)
        return value

    with bar:
        trace = robot_search(minmax_normalise(matrix), query, p.query_budget,
                             proxy_names=names, seed=seed)
    for c in candidates:
        if c.digest in queried_accuracy:
            c.scores["query_val_accuracy"] = queried_accuracy[c.digest]
    extra = {"robot": {"weights": dict(zip(names, trace.weights)),
                       "exploration_queries": trace.exploration_queries,
                       "queried": [pool[i].digest for i in trace.queried],
                       "query_val_accuracy": trace.values,
                       "pool": len(pool), "pool_infeasible": len(candidates) - len(pool)}}
    return candidates, pool[trace.best], extra
