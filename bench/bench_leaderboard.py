"""Proxy leaderboard over every ground-truth table, and the default objective's margin.

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.bench_leaderboard          # every table
    python -m bench.bench_leaderboard --tables digits-cnn-sgd --seeds 0 1 2

For each table in tests/fixtures/nas (not the pools) and each proxy seed (a different training
mini-batch *and* initialisation, :func:`slimline.search.leaderboard.score_table`), every
applicable proxy scores every architecture; Kendall tau-b against the seed-averaged test
accuracy is reported as mean +- std over the proxy seeds, with the cost per architecture (the
fastest seed's wall time over the table, model building included, one thread). DisWOT proxies
need the table's teacher and appear only on the tables built with one (``--teacher-proxies``).

The default objective of ``search.nas`` (``accuracy_proxy: ensemble``) is replayed on each
table: ``--draws`` times, ``--queries`` architectures are drawn and their recorded seed-0 val
accuracy plays the short training's answer; the fitted ensemble's tau over the whole table is
averaged over draws (:func:`slimline.search.leaderboard.fitted_ensemble_scores`). The margin
table compares it with #params and with the better of #params and FLOPs on every table.

Writes bench/out/leaderboard.{json,md}; proxy scores are cached in bench/out/proxy-scores/.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import markdown_table, save
from bench.proxy_cache import cached_scores
from slimline.search.ensemble import DEFAULT_MEMBERS, RankEnsemble
from slimline.search.groundtruth import FIXTURE_DIR, load_fixture, load_teacher
from slimline.search.leaderboard import fitted_ensemble_scores, tau, tau_summary
from slimline.search.proxies import get_proxy, list_proxies

DEFAULT_LABEL = "ensemble (default)"
STATIC_LABEL = "all members, equal weights"


def _fmt(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def evaluate_table(name: str, seeds: Sequence[int], *, batch: int, queries: int, draws: int,
                   teacher_proxies: bool, sensitivity: Sequence[int] = (),
                   log=print) -> dict[str, Any]:
    truth = load_fixture(name)
    names = [n for n in list_proxies() if not get_proxy(n).needs_teacher]
    teacher = None
    if teacher_proxies and truth.distilled:
        teacher = load_teacher(truth)
        names = list_proxies()
    runs = [cached_scores(truth, names, s, batch=batch, teacher=teacher, log=log) for s in seeds]
    extra: dict[str, list] = {}
    members = [m for m in DEFAULT_MEMBERS if m in runs[0].scores]
    for label, ensemble in (("params+flops", RankEnsemble.of("params", "flops")),
                            (STATIC_LABEL, RankEnsemble.of(*members))):
        extra[label] = [list(ensemble.score_table(r.scores)) for r in runs]
    fitted, chosen = fitted_ensemble_scores(truth, runs, queries=queries, draws=draws)
    extra[DEFAULT_LABEL] = fitted
    summary = tau_summary(truth, runs, extra=extra)
    target = truth.mean_accuracy("test_accuracy")

    def replay(count: int, **change: Any) -> float:
        scores, _ = fitted_ensemble_scores(truth, runs, queries=count, draws=draws, **change)
        return statistics.fmean(t for t in (tau(s, target)[0] for s in scores) if t is not None)

    budgets = {count: replay(count) for count in sensitivity}
    # The two rules the default adds to a plain fit, each taken away once (same draws).
    variants = {"members alone allowed": replay(queries, singles=True),
                "no confidence rule (plain argmax)": replay(queries, confidence=0.0)}
    s2s = truth.raw.get("seed_to_seed", {}).get("kendall_tau", {}).get("test_accuracy")
    return {"table": truth.name, "architectures": len(truth), "seeds": list(seeds),
            "seed_to_seed_tau": s2s, "families": sorted(set(truth.values("family"))),
            "tau": summary, "default_choices": dict(Counter(chosen)),
            "queries": queries, "draws": draws, "tau_by_queries": budgets,
            "tau_variants": variants}


def margins(result: dict[str, Any]) -> dict[str, float | None]:
    tau = result["tau"]
    default = tau[DEFAULT_LABEL]["mean"]
    params, flops = tau["params"]["mean"], tau["flops"]["mean"]
    best = max(v for v in (params, flops) if v is not None)
    return {"default": default, "params": params, "flops": flops,
            "vs_params": default - params, "vs_best_size": default - best}


def markdown(results: list[dict[str, Any]]) -> str:
    tables = [r["table"] for r in results]
    names = sorted({n for r in results for n in r["tau"]},
                   key=lambda n: -statistics.fmean(
                       [r["tau"][n]["mean"] for r in results
                        if n in r["tau"] and r["tau"][n]["mean"] is not None] or [-9]))
    rows = []
    for name in names:
        means = [r["tau"][name]["mean"] for r in results if name in r["tau"]
                 and r["tau"][name]["mean"] is not None]
        costs = [r["tau"][name]["seconds_per_arch"] for r in results if name in r["tau"]
                 and r["tau"][name]["seconds_per_arch"] is not None]
        rows.append([name, *(_fmt(r["tau"].get(name)) for r in results),
                     f"{statistics.fmean(means):.3f} ({len(means)})" if means else "–",
                     f"{1000 * statistics.median(costs):.1f}" if costs else "–"])
    header = ["objective", *(f"`{t}`" for t in tables), "mean (tables)", "ms / arch"]
    info = ["architectures", *(str(r["architectures"]) for r in results), "", ""]
    s2s = ["seed-to-seed tau", *(f"{r['seed_to_seed_tau']:.3f}" if r["seed_to_seed_tau"]
                                 else "–" for r in results), "", ""]
    lines = [markdown_table(header, [info, s2s, *rows]), ""]
    margin_rows = []
    for r in results:
        m = margins(r)
        top = ", ".join(f"{k} {v}" for k, v in sorted(r["default_choices"].items(),
                                                       key=lambda kv: -kv[1])[:3])
        margin_rows.append([r["table"], f"{m['default']:.3f}", f"{m['params']:.3f}",
                            f"{m['flops']:.3f}", f"{m['vs_params']:+.3f}",
                            f"{m['vs_best_size']:+.3f}", top])
    lines += [markdown_table(["table", "default objective tau", "#params tau", "FLOPs tau",
                              "margin vs #params", "margin vs best of #params/FLOPs",
                              "what the fit chose (draws)"], margin_rows)]
    counts = sorted({int(k) for r in results for k in r["tau_by_queries"]})
    if counts:
        rows = []
        for r in results:
            m = margins(r)
            best = max(m["params"], m["flops"])
            rows.append([r["table"], *(f"{r['tau_by_queries'][k] - best:+.3f}"
                                       if k in r["tau_by_queries"] else "–" for k in counts)])
        lines += ["", "Margin of the default objective over the best of #params/FLOPs, by "
                      "the number of short trainings it is fitted on:", "",
                  markdown_table(["table", *(f"K = {k}" for k in counts)], rows)]
    names = list(results[0].get("tau_variants", {}))
    if names:
        rows = []
        for r in results:
            m = margins(r)
            best = max(m["params"], m["flops"])
            rows.append([r["table"], f"{m['vs_best_size']:+.3f}",
                         *(f"{r['tau_variants'][n] - best:+.3f}" for n in names)])
        lines += ["", f"The default's fit rules, each taken away (K = {results[0]['queries']}; "
                      "margin over the best of #params/FLOPs):", "",
                  markdown_table(["table", "default", *names], rows)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="*", default=None,
                        help="table names (default: every table in tests/fixtures/nas)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="proxy seeds (mini-batch and initialisation)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queries", type=int, default=20,
                        help="short trainings the default ensemble is fitted on (the stage's "
                             "ensemble_queries)")
    parser.add_argument("--sensitivity", nargs="*", type=int, default=[5, 10, 20, 40],
                        help="also replay the default with these numbers of queries")
    parser.add_argument("--draws", type=int, default=60, help="query draws per table")
    parser.add_argument("--teacher-proxies", action="store_true",
                        help="also score DisWOT on tables built with a teacher")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.tables or sorted(p.stem for p in FIXTURE_DIR.glob("*.json"))
    results = [evaluate_table(n, args.seeds, batch=args.batch, queries=args.queries,
                              draws=args.draws, teacher_proxies=args.teacher_proxies,
                              sensitivity=args.sensitivity,
                              log=lambda s: print(s, flush=True)) for n in names]
    save("leaderboard", {"results": results, "queries": args.queries, "draws": args.draws,
                         "seeds": args.seeds, "batch": args.batch}, markdown(results))


if __name__ == "__main__":
    main()
