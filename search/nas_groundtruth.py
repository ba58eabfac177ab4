"""How well ``search.nas``'s own accuracy objective ranks a trained ground-truth table.

When a table of :mod:`slimline.search.groundtruth_data` covers the stage's space (same dataset,
at least :data:`MIN_ARCHITECTURES` of its architectures valid in the space) or is named by the
stage's ``groundtruth`` parameter, the stage scores the table's architectures with its own
objective (same proxy mini-batch, seed and, for the ensemble, reference pool) and reports
Kendall's tau against the table's seed-averaged test accuracy, next to #params and FLOPs. That
is the number that says whether the objective beat counting parameters on this kind of space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimline.search.groundtruth_data import FIXTURE_DIR, GroundTruth, load_fixture
from slimline.search.leaderboard import tau

__all__ = ["MIN_ARCHITECTURES", "groundtruth_check", "groundtruth_lines", "matching_tables"]

MIN_ARCHITECTURES = 20


def _valid(space: Any, truth: GroundTruth) -> list[int]:
    keep = []
    for index, entry in enumerate(truth.architectures):
        try:
            space.validate(space.architecture_from_dict(entry["arch"]))
        except (ValueError, KeyError, TypeError):
            continue
        keep.append(index)
    return keep


def matching_tables(space: Any, dataset: str, reference: str = "auto"
                    ) -> list[tuple[GroundTruth, list[int]]]:
    """Tables to check the objective on, each with the indices of its architectures that the
    space can build. ``reference``: ``auto`` (every table in ``tests/fixtures/nas`` of this
    dataset covering the space), ``none``, or a table's name or path."""
    if reference == "none":
        return []
    if reference == "auto":
        paths: Sequence[str | Path] = sorted(FIXTURE_DIR.glob("*.json"))
    else:
        paths = [reference]
    found = []
    for path in paths:
        truth = load_fixture(path)
        if reference == "auto" and truth.dataset != dataset:
            continue
        keep = _valid(space, truth)
        if len(keep) >= (MIN_ARCHITECTURES if reference == "auto" else 2):
            found.append((truth, keep))
    return found


def _objective_scores(setup: Any, truth: GroundTruth, keep: Sequence[int], names: Sequence[str]
                      ) -> dict[str, list[float | None]]:
    from slimline.search.proxies import ProxyError, score_architecture

    evaluator = setup.evaluator
    scores: dict[str, list[float | None]] = {n: [] for n in names}
    for index in keep:
        arch = setup.space.architecture_from_dict(truth.architectures[index]["arch"])
        for name in names:
            try:
                value = score_architecture(lambda a=arch: setup.space.build_model(a), [name],
                                           evaluator.inputs, seed=evaluator.seed)[name]
            except ProxyError:
                value = math.nan
            scores[name].append(None if math.isnan(value) else value)
    return scores


def groundtruth_check(setup: Any, dataset: str, reference: str = "auto", *,
                      robot_weights: dict[str, float] | None = None,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One record per matching table: the objective's tau and #params' / FLOPs' over the
    table's architectures that the space can build."""
    from slimline.search.nas_ensemble import ENSEMBLE
    from slimline.search.robot import combined_scores, minmax_normalise

    p = setup.params
    records = []
    for truth, keep in matching_tables(setup.space, dataset, reference):
        target = [truth.mean_accuracy("test_accuracy")[i] for i in keep]
        if p.strategy == "robot":
            names, label = list(robot_weights or {}), "RoBoT's weighted proxies"
            raw = _objective_scores(setup, truth, keep, names)
            matrix = np.array([[math.nan if v is None else v for v in raw[n]] for n in names]).T
            objective = list(combined_scores(minmax_normalise(matrix),
                                             [robot_weights[n] for n in names]))
        elif p.accuracy_proxy == ENSEMBLE:
            names = setup.ensemble.ensemble.members
            label = f"ensemble ({setup.ensemble.ensemble.label})"
            raw = _objective_scores(setup, truth, keep, names)
            objective = list(setup.ensemble.scores(raw))
        else:
            names, label = [p.accuracy_proxy], p.accuracy_proxy
            objective = _objective_scores(setup, truth, keep, names)[p.accuracy_proxy]
        tau_objective, scored = tau(objective, target)
        record = {
            "table": truth.name, "architectures": len(keep), "scored": scored,
            "objective": label,
            "tau_objective": tau_objective,
            "tau_params": tau([truth.architectures[i]["params"] for i in keep], target)[0],
            "tau_flops": tau([truth.architectures[i]["flops"] for i in keep], target)[0],
            "seed_to_seed_tau": truth.raw.get("seed_to_seed", {}).get("kendall_tau", {}).get(
                "test_accuracy"),
        }
        log(f"ground truth {truth.name!r} ({len(keep)} architectures): objective tau "
            f"{_fmt(record['tau_objective'])}, #params {_fmt(record['tau_params'])}")
        records.append(record)
    return records


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def groundtruth_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """The markdown section of ``search.md``."""
    if not records:
        return ["", "No ground-truth table covers this space, so the objective's rank "
                "correlation with trained accuracy is unknown here (bench/RESULTS.md has it "
                "for the benchmark spaces)."]
    lines = ["", "## Objective vs trained accuracy (ground truth)", "",
             "Kendall tau against the table's seed-averaged test accuracy:", "",
             "| table | architectures | objective | tau objective | tau #params | tau FLOPs "
             "| seed-to-seed tau |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| `{r['table']}` | {r['architectures']} | {r['objective']} | "
                     f"{_fmt(r['tau_objective'])} | {_fmt(r['tau_params'])} | "
                     f"{_fmt(r['tau_flops'])} | {_fmt(r['seed_to_seed_tau'])} |")
    return lines
