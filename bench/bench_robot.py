"""RoBoT vs random search vs single proxies vs the default ensemble, same query budget, on pools.

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.bench_robot            # every pool, T = 5 10 20
    python -m bench.bench_robot --pools digits-cnn-full --budgets 5 10 20 --seeds 20
    python -m bench.bench_robot --tables digits-cnn mnist1d-seq         # the small tables too

A pool (tests/fixtures/nas/pools/, >= 1,000 architectures, every one trained) is scored once by
every proxy for each of three proxy seeds (cached in bench/out/proxy-scores/). A *query* returns
the architecture's recorded seed-0 validation accuracy (what one short training tells a search;
answered from the trained pool itself, no surrogate); the *truth* is the seed-averaged test
accuracy. Every method gets ``T`` distinct queries and returns its best-queried architecture; we
report that architecture's rank in the pool by truth (1 = best) and its regret (best truth in
the pool minus its truth, in accuracy points), mean +- std over ``--seeds`` search seeds
(search seed ``s`` uses proxy seed ``s % 3``):

* ``robot``: RoBoT (GP-BO over weights in [-1, 1]^M of the min-max-normalised proxies, T - 1
  proposals, then greedy exploitation of the best weights; :mod:`slimline.search.robot`);
* ``random``: ``T`` distinct random architectures;
* ``ensemble``: the default objective of ``search.nas``, fitted on ``ceil(T / 2)`` random
  queries, then its top architectures queried until ``T`` (:mod:`slimline.search.ensemble`);
* single proxies: each proxy's top-``T``; the table shows #params, the median proxy and the
  best proxy in hindsight (an oracle choice a search cannot make).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench.common import markdown_table, save
from bench.proxy_cache import cached_scores
from slimline.search.ensemble import (
    RankEnsemble,
    candidate_ensembles,
    fit_ensemble,
    percentile_ranks,
)
from slimline.search.groundtruth import POOL_DIR, load_fixture
from slimline.search.robot import (
    SearchTrace,
    minmax_normalise,
    proxy_greedy_search,
    random_search,
    robot_search,
)

# RoBoT's own proxy set (their NAS-Bench-201 script), two activation proxies, and the size
# baselines (the issue asks for params, flops and naswot among the members).
DEFAULT_PROXIES = ["grad_norm", "snip", "grasp", "fisher", "synflow", "jacob_cov", "naswot",
                   "zen", "params", "flops"]


def truth_ranks(accuracy: Sequence[float]) -> np.ndarray:
    """Rank 1 = most accurate; ties share the best rank."""
    values = np.asarray(accuracy)
    order = np.sort(values)[::-1]
    return 1 + np.searchsorted(-order, -values, side="left")


def ensemble_search(scores: dict[str, list[float | None]], query, budget: int, *, seed: int,
                    fit_on: str = "random") -> SearchTrace:
    """Fit the default ensemble on ``ceil(budget / 2)`` queries, then query its top
    architectures until ``budget`` distinct ones were seen. ``fit_on``: ``random``
    architectures (what the whole-table tau is estimated from), or the prior's (#params') top
    ones (the region the search must rank: no query is spent far from it)."""
    from slimline.search.ensemble import DEFAULT_MEMBERS

    members = [m for m in DEFAULT_MEMBERS if m in scores]
    count = len(next(iter(scores.values())))
    ranks = {m: percentile_ranks(scores[m]) for m in members}
    prior = RankEnsemble.of("params") if "params" in members else RankEnsemble.of(members[0])
    if fit_on == "random":
        trace = random_search(count, query, math.ceil(budget / 2), seed=seed)
    else:
        order = np.argsort(-np.nan_to_num(prior.combine(ranks), nan=-np.inf), kind="stable")
        picks = [int(i) for i in order[: math.ceil(budget / 2)]]
        trace = SearchTrace(queried=picks, values=[float(query(i)) for i in picks])
    fit = fit_ensemble({m: r[trace.queried] for m, r in ranks.items()}, trace.values,
                       candidates=candidate_ensembles(members), prior=prior, seed=seed)
    combined = np.nan_to_num(fit.chosen.combine(ranks), nan=-np.inf)
    for index in np.argsort(-combined, kind="stable"):
        if len(trace.queried) >= budget:
            break
        if int(index) not in trace.queried:
            trace.queried.append(int(index))
            trace.values.append(float(query(int(index))))
    trace.weights = [fit.chosen.to_dict().get(m, 0.0) for m in members]
    return trace


def compare(truth: Any, runs: list[Any], budget: int, seeds: int) -> dict[str, Any]:
    """Every method at one budget over ``seeds`` search seeds."""
    query_values = np.array([a["val_accuracy"][0] for a in truth.architectures])
    target = np.array(truth.mean_accuracy("test_accuracy"))
    ranks, best = truth_ranks(target), float(target.max())

    def query(i: int) -> float:
        return float(query_values[i])

    def outcome(index: int) -> tuple[int, float]:
        return int(ranks[index]), 100.0 * (best - float(target[index]))

    names = list(runs[0].scores)
    found: dict[str, list[tuple[int, float]]] = {"robot": [], "random": [], "ensemble": [],
                                                 "ensemble_top": []}
    single: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    explored = []
    for s in range(seeds):
        run = runs[s % len(runs)]
        matrix = np.array([[np.nan if v is None else v for v in run.scores[n]]
                           for n in names]).T
        trace = robot_search(minmax_normalise(matrix), query, budget, proxy_names=names, seed=s)
        found["robot"].append(outcome(trace.best))
        explored.append(trace.exploration_queries)
        found["random"].append(outcome(random_search(len(target), query, budget, seed=s).best))
        found["ensemble"].append(outcome(ensemble_search(run.scores, query, budget,
                                                         seed=s).best))
        found["ensemble_top"].append(outcome(ensemble_search(
            run.scores, query, budget, seed=s, fit_on="prior_top").best))
        for m, name in enumerate(names):
            single[name].append(outcome(proxy_greedy_search(matrix[:, m], query, budget).best))

    def stats(pairs: list[tuple[int, float]]) -> dict[str, float]:
        r, g = [p[0] for p in pairs], [p[1] for p in pairs]
        return {"rank": statistics.fmean(r), "rank_std": statistics.pstdev(r),
                "regret": statistics.fmean(g), "regret_std": statistics.pstdev(g)}

    per_proxy = {n: stats(v) for n, v in single.items()}
    # What RoBoT's exploration can reach at all: the argmax architectures of random weight
    # vectors in [-1, 1]^M (proxy seed 0). Few distinct ones, none near the top, means BO over
    # weights has little to find, whatever its budget.
    matrix = minmax_normalise(np.array([[np.nan if v is None else v for v in runs[0].scores[n]]
                                        for n in names]).T)
    weights = np.random.default_rng(0).uniform(-1.0, 1.0, size=(len(names), 2000))
    reachable = np.unique(np.argmax(matrix @ weights, axis=0))
    ordered = sorted(per_proxy, key=lambda n: per_proxy[n]["rank"])
    median = ordered[len(ordered) // 2]
    return {
        "budget": budget, "pool": len(target), "seeds": seeds,
        **{k: stats(v) for k, v in found.items()},
        "robot_exploration_queries": statistics.fmean(explored),
        "reachable_argmax": len(reachable), "reachable_best_rank": int(ranks[reachable].min()),
        "single": per_proxy, "best_proxy": ordered[0], "median_proxy": median,
        "params": per_proxy.get("params"),
    }


def objective_on_pool(truth: Any, runs: list[Any], queries: int = 20, draws: int = 60
                      ) -> dict[str, Any]:
    """Kendall tau of the replayed default objective over the whole pool, next to #params and
    FLOPs (the leaderboard's margin, on pools the ensemble was not tuned on)."""
    from slimline.search.leaderboard import fitted_ensemble_scores, tau

    target = truth.mean_accuracy("test_accuracy")
    scores, _ = fitted_ensemble_scores(truth, runs, queries=queries, draws=draws)
    return {"pool": truth.name, "archs": len(truth),
            "default": statistics.fmean(tau(s, target)[0] for s in scores),
            "params": tau(runs[0].scores["params"], target)[0],
            "flops": tau(runs[0].scores["flops"], target)[0]}


def _cell(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "–"
    return (f"{entry['rank']:.1f} ± {entry['rank_std']:.1f} "
            f"({entry['regret']:.2f} ± {entry['regret_std']:.2f} pp)")


def markdown(results: list[dict[str, Any]], proxies: Sequence[str], seeds: int) -> str:
    rows = []
    for r in results:
        best, median = r["single"][r["best_proxy"]], r["single"][r["median_proxy"]]
        methods = {k: (r[k] or {"rank": math.inf})["rank"]
                   for k in ("robot", "random", "ensemble", "ensemble_top", "params")}
        winner = " = ".join(k for k, v in methods.items() if v == min(methods.values()))
        rows.append([r["pool_name"], r["budget"], r["pool"],
                     f"{_cell(r['robot'])} [T0 {r['robot_exploration_queries']:.1f}]",
                     _cell(r["random"]), _cell(r["ensemble"]), _cell(r["ensemble_top"]),
                     _cell(r["params"]),
                     f"{_cell(median)} `{r['median_proxy']}`",
                     f"{_cell(best)} `{r['best_proxy']}`", winner])
    table = markdown_table(
        ["pool", "T", "archs", "RoBoT [BO queries]", "random", "ensemble (default), fit on "
         "random", "ensemble, fit on #params' top", "#params top-T", "median proxy",
         "best proxy (hindsight)", "best of RoBoT/random/ensembles/#params"], rows)
    seen: dict[str, dict[str, Any]] = {}
    for r in results:
        seen.setdefault(r["pool_name"], r)
    reach = markdown_table(
        ["pool", "archs", "distinct argmax of 2,000 random weight vectors",
         "best rank among them"],
        [[name, r["pool"], r["reachable_argmax"], r["reachable_best_rank"]]
         for name, r in seen.items()])
    return (f"Rank (1 = best in the pool by seed-mean test accuracy) and regret (accuracy "
            f"points below the pool's best) of the returned architecture, mean ± std over "
            f"{seeds} search seeds; queries return seed-0 val accuracy; proxies: "
            f"{', '.join(proxies)}\n\n{table}\n\nWhat RoBoT's weight search can reach "
            f"(proxy seed 0):\n\n{reach}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", nargs="*", default=None,
                        help="pool names (default: every pool in tests/fixtures/nas/pools)")
    parser.add_argument("--tables", nargs="*", default=[],
                        help="also run on these (small) tables")
    parser.add_argument("--proxies", nargs="+", default=DEFAULT_PROXIES)
    parser.add_argument("--budgets", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--seeds", type=int, default=20, help="search seeds (>= 10)")
    parser.add_argument("--proxy-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pools = args.pools if args.pools is not None else sorted(
        f"pools/{p.stem}" for p in POOL_DIR.glob("*.json"))
    results, objective_checks = [], []
    for name in [*pools, *args.tables]:
        truth = load_fixture(name)
        runs = [cached_scores(truth, args.proxies, s, batch=args.batch,
                              log=lambda line: print(line, flush=True))
                for s in args.proxy_seeds]
        for budget in args.budgets:
            results.append({"pool_name": truth.name, **compare(truth, runs, budget,
                                                               args.seeds)})
        objective_checks.append(objective_on_pool(truth, runs))
    text = markdown(results, args.proxies, args.seeds)
    text += "\n\nThe default objective's ranking of each whole pool (replayed, 20 queries, 60 " \
            "draws; Kendall tau vs seed-mean test accuracy):\n\n" + markdown_table(
                ["pool", "archs", "default objective", "#params", "FLOPs", "margin vs best"],
                [[c["pool"], c["archs"], f"{c['default']:.3f}", f"{c['params']:.3f}",
                  f"{c['flops']:.3f}", f"{c['default'] - max(c['params'], c['flops']):+.3f}"]
                 for c in objective_checks])
    save("robot", {"results": results, "objective_on_pools": objective_checks,
                   "proxies": args.proxies, "seeds": args.seeds}, text)


if __name__ == "__main__":
    main()
