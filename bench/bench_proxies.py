"""Zero-cost proxies: cost per architecture and rank correlation with trained accuracy.

    python -m bench.bench_proxies                        # cost + every fixture in tests/fixtures/nas
    python -m bench.bench_proxies --fixtures digits-cnn  # cost + one fixture
    python -m bench.bench_proxies --fixtures             # cost only

* **Cost**: architectures scored per second, per proxy, on ``slimline.search.space.default_space()``
  (``--cost-count`` sampled architectures, one fixed digits mini-batch of ``--batch``; each
  score builds a fresh model, as a search would; the DisWOT teacher here is an untrained
  architecture of the space, which costs what a trained one does). Single-threaded CPU; proxies
  take turns over ``--rounds`` rounds and the fastest round is kept (shared machine).
* **Ranking** (for each ground-truth fixture, :mod:`slimline.search.groundtruth`): Kendall tau-b and
  Spearman rho of every applicable proxy's scores against the seed-averaged test accuracy, next
  to #params and FLOPs and to the fixture's seed-to-seed tau (the ceiling a proxy can reach);
  DisWOT proxies also against the distilled test accuracy, and whether DisWOT's top pick
  distills better than the top pick of the best vanilla proxy.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bench.common import markdown_table, save
from slimline.search.proxies import (
    ProxyError,
    ProxyInputs,
    get_proxy,
    list_proxies,
    score_architecture,
)

VANILLA_KEY = "test_accuracy"
DISTILLED_KEY = "distilled_test_accuracy"


def proxy_inputs(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    size: int,
    *,
    seed: int = 0,
    teacher: nn.Module | None = None,
) -> ProxyInputs:
    """A fixed, seeded mini-batch of ``size`` samples (the same for every architecture)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(x.shape[0], generator=generator)[:size]
    return ProxyInputs(x[index], y[index], num_classes, teacher=teacher)


def applicable_proxies(model: nn.Module, names: Sequence[str], inputs: ProxyInputs) -> list[str]:
    return [
        n
        for n in names
        if get_proxy(n).applicable(model)
        and (inputs.teacher is not None or not get_proxy(n).needs_teacher)
    ]


def measure_cost(
    space: Any,
    names: Sequence[str],
    inputs: ProxyInputs,
    count: int,
    *,
    rounds: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Architectures per second for each proxy (model building included). Proxies take turns
    within each of ``rounds`` rounds and the fastest round counts: the machine is shared, and
    the fastest round is the one least disturbed by other processes."""
    archs = space.sample(count, seed=seed)
    best: dict[str, float] = {name: math.inf for name in names}
    for _ in range(rounds):
        for name in names:
            started = time.perf_counter()
            for arch in archs:
                score_architecture(lambda a=arch: space.build_model(a), [name], inputs, seed=seed)
            best[name] = min(best[name], time.perf_counter() - started)
    return [
        {
            "proxy": name,
            "architectures": len(archs),
            "seconds": best[name],
            "per_second": len(archs) / best[name],
        }
        for name in names
    ]


def score_fixture(
    truth: Any, names: Sequence[str], inputs: ProxyInputs, *, seed: int = 0
) -> dict[str, list[float | None]]:
    """``{proxy: [score per architecture]}``; None where a proxy does not apply."""
    scores: dict[str, list[float | None]] = {name: [] for name in names}
    for index in range(len(truth)):
        for name in names:
            try:
                value = score_architecture(
                    lambda i=index: truth.build_model(i), [name], inputs, seed=seed
                )[name]
            except ProxyError:
                value = None
            scores[name].append(value)
    return scores


def _pairs(values: Sequence[float | None], target: Sequence[float]) -> tuple[list, list]:
    kept = [(v, t) for v, t in zip(values, target) if v is not None and v == v]
    return [v for v, _ in kept], [t for _, t in kept]


def correlation_rows(
    truth: Any, scores: dict[str, list[float | None]], subset: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """tau/rho of every proxy (and the params/FLOPs columns of the fixture) vs accuracy, over
    the architectures in ``subset`` (default: all)."""
    from slimline.search.groundtruth import kendall_tau, spearman

    keep = list(range(len(truth))) if subset is None else list(subset)
    vanilla = [truth.mean_accuracy(VANILLA_KEY)[i] for i in keep]
    has_distilled = getattr(truth, "distilled", True)
    distilled = ([truth.mean_accuracy(DISTILLED_KEY)[i] for i in keep] if has_distilled
                 else [math.nan] * len(keep))
    columns = dict(scores)
    columns["fixture:params"] = [float(v) for v in truth.values("params")]
    columns["fixture:flops"] = [float(v) for v in truth.values("flops")]
    rows = []
    for name, all_values in columns.items():
        values = [all_values[i] for i in keep]
        x, y = _pairs(values, vanilla)
        xd, yd = _pairs(values, distilled)
        rows.append(
            {
                "proxy": name,
                "scored": len(x),
                "kendall_tau": kendall_tau(x, y) if len(x) > 1 else None,
                "spearman": spearman(x, y) if len(x) > 1 else None,
                "kendall_tau_distilled": kendall_tau(xd, yd) if len(xd) > 1 else None,
                "spearman_distilled": spearman(xd, yd) if len(xd) > 1 else None,
            }
        )
    return rows


def top_pick(values: Sequence[float | None]) -> int | None:
    """Index of the highest score (first on ties), None when nothing was scored."""
    scored = [(v, -i) for i, v in enumerate(values) if v is not None and v == v]
    return -max(scored)[1] if scored else None


def diswot_vs_vanilla(
    truth: Any, scores: dict[str, list[float | None]], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Distilled accuracy of each DisWOT proxy's top pick vs that of the best vanilla proxy's
    (highest Kendall tau against vanilla accuracy, size baselines excluded)."""
    if not getattr(truth, "distilled", True):
        return []  # a vanilla-only table: nothing distilled to compare
    distilled = truth.mean_accuracy(DISTILLED_KEY)
    teacherless = [
        r
        for r in rows
        if r["proxy"] in scores
        and not get_proxy(r["proxy"]).needs_teacher
        and r["proxy"] not in ("params", "flops")
        and r["kendall_tau"] is not None
    ]
    if not teacherless:
        return []
    best = max(teacherless, key=lambda r: r["kendall_tau"])["proxy"]
    best_pick = top_pick(scores[best])
    out = []
    for name in (n for n in scores if get_proxy(n).needs_teacher):
        pick = top_pick(scores[name])
        if pick is None or best_pick is None:
            continue
        out.append(
            {
                "diswot_proxy": name,
                "diswot_pick": truth.architectures[pick]["digest"],
                "diswot_pick_distilled": distilled[pick],
                "best_vanilla_proxy": best,
                "vanilla_pick": truth.architectures[best_pick]["digest"],
                "vanilla_pick_distilled": distilled[best_pick],
                "best_in_fixture_distilled": max(distilled),
                "same_pick": pick == best_pick,
                "diswot_better": distilled[pick] > distilled[best_pick],
            }
        )
    return out


def evaluate_fixture(
    truth: Any, teacher: nn.Module | None, names: Sequence[str], batch: int, *, seed: int = 0
) -> dict[str, Any]:
    """Everything the ranking section reports for one fixture."""
    dataset = truth.load_dataset()
    inputs = proxy_inputs(
        dataset.x_train, dataset.y_train, dataset.num_classes, batch, seed=seed, teacher=teacher
    )
    # A union space mixes families (e.g. cnn1d and gru): a proxy is kept when it applies to at
    # least one family, scored None on the others, and ranked per family too.
    families = [str(f) for f in truth.values("family")]
    members = {f: [i for i, g in enumerate(families) if g == f] for f in dict.fromkeys(families)}
    names = [
        n
        for n in names
        if any(
            n in applicable_proxies(truth.build_model(m[0]), [n], inputs) for m in members.values()
        )
    ]
    started = time.perf_counter()
    scores = score_fixture(truth, names, inputs, seed=seed)
    rows = correlation_rows(truth, scores)
    per_family = (
        {f: correlation_rows(truth, scores, m) for f, m in members.items()}
        if len(members) > 1
        else {}
    )
    seed_to_seed = truth.raw.get("seed_to_seed", {}).get("kendall_tau", {})
    return {
        "fixture": truth.name,
        "complete": bool(truth.raw.get("complete", True)),
        "architectures": len(truth),
        "proxies": names,
        "seconds": time.perf_counter() - started,
        "seed_to_seed_kendall_tau": seed_to_seed,
        "correlations": rows,
        "per_family": per_family,
        "diswot_vs_vanilla": diswot_vs_vanilla(truth, scores, rows),
        "scores": scores,
    }


def _correlation_table(rows: list[dict[str, Any]]) -> str:
    keys = ("kendall_tau", "spearman", "kendall_tau_distilled", "spearman_distilled")
    return markdown_table(
        ["proxy", "n", "tau", "rho", "tau (distilled)", "rho (distilled)"],
        [[r["proxy"], r["scored"], *(r[k] for k in keys)] for r in rows],
    )


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(cost: list[dict[str, Any]], fixtures: list[dict[str, Any]], pending: str) -> str:
    parts = [
        "### Proxy cost (default CNN space, 1 CPU thread, fastest of the rounds)",
        "",
        markdown_table(
            ["proxy", "archs", "archs/s"],
            [[r["proxy"], r["architectures"], r["per_second"]] for r in cost],
        ),
    ]
    for result in fixtures:
        s2s = result["seed_to_seed_kendall_tau"]
        status = "" if result["complete"] else ", fixture still being built"
        parts += [
            "",
            f"### Ranking on fixture `{result['fixture']}` ({result['architectures']} archs"
            f"{status}; seed-to-seed tau: test {_fmt(s2s.get(VANILLA_KEY))}, distilled "
            f"{_fmt(s2s.get(DISTILLED_KEY))})",
            "",
            _correlation_table(result["correlations"]),
        ]
        for family, rows in result.get("per_family", {}).items():
            parts += ["", f"Family `{family}` only:", "", _correlation_table(rows)]
        if result["diswot_vs_vanilla"]:
            header = [
                "DisWOT proxy",
                "its pick (distilled acc)",
                "best vanilla proxy",
                "its pick (distilled acc)",
                "best in fixture",
                "same pick",
                "DisWOT better",
            ]
            keys = (
                "diswot_proxy",
                "diswot_pick_distilled",
                "best_vanilla_proxy",
                "vanilla_pick_distilled",
                "best_in_fixture_distilled",
                "same_pick",
                "diswot_better",
            )
            rows = [[d[k] for k in keys] for d in result["diswot_vs_vanilla"]]
            parts += ["", markdown_table(header, rows)]
    if pending:
        parts += ["", pending]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-count", type=int, default=20, help="architectures for the cost")
    parser.add_argument("--rounds", type=int, default=3, help="cost rounds (fastest kept)")
    parser.add_argument("--batch", type=int, default=64, help="mini-batch size of every proxy")
    parser.add_argument(
        "--fixtures",
        nargs="*",
        default=None,
        help="fixture names or paths (default: all in tests/fixtures/nas)",
    )
    parser.add_argument("--proxies", nargs="*", default=None, help="default: all registered")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from slimline.data import load_dataset
    from slimline.search.groundtruth import FIXTURE_DIR, load_fixture, load_teacher
    from slimline.search.space import default_space

    names = args.proxies or list_proxies()
    space = default_space()
    digits = load_dataset("digits")
    cost_inputs = proxy_inputs(
        digits.x_train,
        digits.y_train,
        digits.num_classes,
        args.batch,
        seed=args.seed,
        teacher=space.build_model(space.sample(1)[0]),
    )
    cost = measure_cost(
        space,
        applicable_proxies(space.build_model(space.sample(1)[0]), names, cost_inputs),
        cost_inputs,
        args.cost_count,
        rounds=args.rounds,
        seed=args.seed,
    )
    paths = args.fixtures
    if paths is None:
        paths = sorted(str(p) for p in Path(FIXTURE_DIR).glob("*.json"))
    fixtures, pending = [], ""
    for path in paths:
        truth = load_fixture(path)
        fixtures.append(
            evaluate_fixture(truth, load_teacher(truth) if truth.distilled else None, names,
                             args.batch, seed=args.seed)
        )
    if not paths:
        pending = (
            "No ground-truth fixture given or found in tests/fixtures/nas: ranking not measured."
        )
    data = {
        "batch": args.batch,
        "seed": args.seed,
        "cost": cost,
        "fixtures": fixtures,
        "pending": pending,
    }
    save("proxies", data, markdown(cost, fixtures, pending))


if __name__ == "__main__":
    main()
