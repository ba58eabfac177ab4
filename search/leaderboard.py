"""Proxy leaderboard: how well each zero-cost proxy (or ensemble) ranks a ground-truth table.

For a fixture (:mod:`slimline.search.groundtruth_data`) and a *proxy seed* ``s``, every
architecture is scored by every applicable proxy on one mini-batch drawn with ``s`` from the
training split, each proxy on a fresh model initialised with ``torch.manual_seed(s)``
(:func:`score_table`). Different proxy seeds change both the batch and the initial weights, so
the spread of Kendall's tau over seeds is the proxy's own noise; the table's seed-to-seed tau
is the ground truth's. :func:`tau_summary` reduces the per-seed scores to tau mean +- std.

    truth = load_fixture("digits-cnn-sgd")
    runs = [score_table(truth, ["params", "naswot"], seed=s) for s in range(3)]
    tau_summary(truth, runs)["naswot"]   # {'mean': ..., 'std': ..., 'scored': 120, ...}
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimline.search.groundtruth_data import GroundTruth, kendall_tau
from slimline.search.proxies import ProxyError, ProxyInputs, get_proxy, score_architecture

__all__ = [
    "TableScores",
    "applicable_proxies",
    "proxy_batch",
    "score_table",
    "tau",
    "tau_summary",
]

Scores = dict[str, list[float | None]]


@dataclass
class TableScores:
    """Every proxy's score of every architecture of one fixture, for one proxy seed; ``None``
    where a proxy does not apply (another family of a mixed table) or broke down (NaN).
    ``seconds`` is the wall time each proxy took over the whole table, model building
    included (what a search pays per architecture, times the table's size)."""

    fixture: str
    seed: int
    batch: int
    scores: Scores
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"fixture": self.fixture, "seed": self.seed, "batch": self.batch,
                "scores": self.scores, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableScores:
        return cls(data["fixture"], int(data["seed"]), int(data["batch"]),
                   {k: list(v) for k, v in data["scores"].items()}, dict(data["seconds"]))


def proxy_batch(truth: GroundTruth, size: int, seed: int, *,
                teacher: torch.nn.Module | None = None) -> ProxyInputs:
    """``size`` training samples drawn with ``seed`` (the same batch for every architecture)."""
    dataset = truth.load_dataset()
    x, y = dataset.split("train")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return ProxyInputs(x[pick], y[pick], dataset.num_classes, teacher=teacher)


def applicable_proxies(truth: GroundTruth, names: Sequence[str], inputs: ProxyInputs
                       ) -> list[str]:
    """The proxies of ``names`` that apply to at least one family of the table (a teacher-aware
    proxy only with a teacher)."""
    families: dict[str, int] = {}
    for index, family in enumerate(truth.values("family")):
        families.setdefault(str(family), index)
    models = [truth.build_model(i) for i in families.values()]
    kept = []
    for name in names:
        proxy = get_proxy(name)
        if proxy.needs_teacher and inputs.teacher is None:
            continue
        if any(proxy.applicable(m) for m in models):
            kept.append(name)
    return kept


def score_table(truth: GroundTruth, names: Sequence[str], *, seed: int, batch: int = 64,
                teacher: torch.nn.Module | None = None,
                log: Callable[[str], None] | None = None) -> TableScores:
    """Score every architecture of ``truth`` with every applicable proxy of ``names``."""
    inputs = proxy_batch(truth, batch, seed, teacher=teacher)
    usable = applicable_proxies(truth, names, inputs)
    families = [str(f) for f in truth.values("family")]
    probes = {f: truth.build_model(families.index(f)) for f in dict.fromkeys(families)}
    applies = {(name, f): get_proxy(name).applicable(m) for name in usable
               for f, m in probes.items()}
    scores: Scores = {name: [] for name in usable}
    seconds = dict.fromkeys(usable, 0.0)
    for index in range(len(truth)):
        for name in usable:
            value: float | None = None
            started = time.perf_counter()
            if applies[name, families[index]]:
                try:
                    value = score_architecture(lambda i=index: truth.build_model(i), [name],
                                               inputs, seed=seed)[name]
                except ProxyError:  # NaN: degenerate at this init
                    value = None
            seconds[name] += time.perf_counter() - started
            scores[name].append(value)
        if log is not None and (index + 1) % 50 == 0:
            log(f"[{truth.name} seed {seed}] {index + 1}/{len(truth)} scored")
    return TableScores(truth.name, seed, batch, scores,
                       {k: round(v, 4) for k, v in seconds.items()})


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def tau(values: Sequence[float | None], target: Sequence[float],
        subset: Sequence[int] | None = None) -> tuple[float | None, int]:
    """Kendall tau-b of ``values`` against ``target`` over ``subset`` (default: all) where a
    value exists, and how many architectures that was. A proxy that scored ``-inf`` (naswot
    with repeated codes) ranks last among them, as in a search."""
    keep = range(len(target)) if subset is None else subset
    pairs = [(float(values[i]), target[i]) for i in keep if _usable(values[i])]
    finite = [v for v, _ in pairs if math.isfinite(v)] or [0.0]
    low, high = min(finite) - 1.0, max(finite) + 1.0
    x = [v if math.isfinite(v) else (low if v < 0 else high) for v, _ in pairs]
    y = [t for _, t in pairs]
    return (kendall_tau(x, y) if len(x) > 1 else None), len(x)


def tau_summary(truth: GroundTruth, runs: Sequence[TableScores], *,
                target_key: str = "test_accuracy", subset: Sequence[int] | None = None,
                extra: Mapping[str, Sequence[Sequence[float | None]]] | None = None
                ) -> dict[str, dict[str, Any]]:
    """``{proxy: {mean, std, per_seed, scored, seconds_per_arch}}`` of Kendall tau against the
    seed-averaged ``target_key``. ``extra`` adds objectives computed elsewhere (one score list
    per proxy seed, e.g. ensembles). ``std`` is the population std over proxy seeds (0 for one
    seed); ``seconds_per_arch`` the fastest seed's time divided by the architectures."""
    target = truth.mean_accuracy(target_key)
    columns: dict[str, list[Sequence[float | None]]] = {}
    for run in runs:
        for name, values in run.scores.items():
            columns.setdefault(name, []).append(values)
    for name, per_seed in (extra or {}).items():
        columns[name] = list(per_seed)
    out: dict[str, dict[str, Any]] = {}
    for name, per_seed in columns.items():
        results = [tau(values, target, subset) for values in per_seed]
        taus = [t for t, _ in results if t is not None]
        costs = [r.seconds[name] for r in runs if name in r.seconds]
        out[name] = {
            "mean": statistics.fmean(taus) if taus else None,
            "std": statistics.pstdev(taus) if len(taus) > 1 else (0.0 if taus else None),
            "per_seed": [t for t, _ in results],
            "scored": max((n for _, n in results), default=0),
            "seconds_per_arch": min(costs) / len(truth) if costs else None,
        }
    return out


def fitted_ensemble_scores(truth: GroundTruth, runs: Sequence[TableScores], *, queries: int,
                           draws: int, members: Sequence[str] | None = None,
                           query_key: str = "val_accuracy", seed: int = 0,
                           singles: bool = False, confidence: float | None = None
                           ) -> tuple[list[list[float]], list[str]]:
    """The default objective of ``search.nas`` replayed on a table: ``draws`` times, ``queries``
    architectures are drawn at random, their recorded seed-0 ``query_key`` plays the short
    training's answer, and :func:`slimline.search.ensemble.fit_ensemble` is fitted on them
    (percentile ranks within the table, proxy seed ``draw % len(runs)``). Returns one score
    list per draw and the label each draw chose (the tau over draws is the objective's
    expected tau on this table). ``singles`` and ``confidence`` change the fit, for the
    comparisons in bench/RESULTS.md."""
    import numpy as np

    from slimline.search.ensemble import (
        DEFAULT_MEMBERS,
        RankEnsemble,
        candidate_ensembles,
        fit_ensemble,
        percentile_ranks,
    )

    wanted = list(members or DEFAULT_MEMBERS)
    observed = np.array([a[query_key][0] for a in truth.architectures])
    rng = np.random.default_rng(seed)
    scores, chosen = [], []
    for draw in range(draws):
        run = runs[draw % len(runs)]
        usable = [m for m in wanted if m in run.scores]
        ranks = {m: percentile_ranks(run.scores[m]) for m in usable}
        picks = rng.choice(len(truth), min(queries, len(truth)), replace=False)
        prior = RankEnsemble.of("params") if "params" in usable else RankEnsemble.of(usable[0])
        fit = fit_ensemble({m: r[picks] for m, r in ranks.items()}, observed[picks],
                           candidates=candidate_ensembles(usable, singles=singles),
                           prior=prior, confidence=confidence, seed=draw)
        scores.append([float(v) for v in fit.chosen.combine(ranks)])
        chosen.append(fit.chosen.label)
    return scores, chosen
