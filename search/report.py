"""What ``search.nas`` leaves behind: ``search.json``, ``search.md`` and ``pareto.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from slimline.search.nas_groundtruth import groundtruth_lines
from slimline.search.pareto import pareto_front, plot_front

__all__ = ["summarise_search"]


def summarise_search(setup: Any, candidates: list[Any], chosen: Any, work_dir: Path, *,
                     teacher: Any = None, example: Any = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the files and return the stage metrics (the report reads ``metrics['search']``);
    ``teacher`` (a module, with one ``example`` input batch) adds its size for comparison."""
    from slimline.compress.prune.flops import count_flops, count_params
    from slimline.io import write_json, write_text

    p = setup.params
    proxy = p.accuracy_proxy if p.strategy != "robot" else "query_val_accuracy"
    rows = [c.to_dict() for c in candidates]
    for row in rows:
        row["accuracy_score"] = row["scores"].get(proxy, math.nan)
        row["feasible"] = setup.limits.feasible(_by_digest(candidates, row["digest"]))
    has_latency = all(r["latency_ms"] is not None for r in rows)
    scored = [i for i, r in enumerate(rows)
              if r["feasible"] and math.isfinite(r["accuracy_score"])]
    front: list[int] = []
    if has_latency and scored:
        local = pareto_front([(rows[i]["accuracy_score"], rows[i]["latency_ms"]) for i in scored],
                             ["maximize", "minimize"])
        front = [scored[i] for i in local]
    chosen_index = next(i for i, r in enumerate(rows) if r["digest"] == chosen.digest)
    summary: dict[str, Any] = {
        "strategy": p.strategy, "space": setup.space.name, "space_size": setup.space.size,
        "evaluated": len(rows), "feasible": sum(r["feasible"] for r in rows),
        "accuracy_objective": proxy, "proxies": list(setup.evaluator.proxies),
        "proxies_skipped": dict(setup.evaluator.skipped),
        "limits": {"max_params": p.max_params, "max_flops": p.max_flops,
                   "max_latency_ms": setup.limits.max_latency_ms},
        "teacher_latency_ms": setup.limits.teacher_latency_ms,
        "chosen": rows[chosen_index], "pareto": [rows[i]["digest"] for i in front],
        "proxy_seconds_mean": _mean(r["seconds"] for r in rows),
        **(extra or {}),
    }
    if teacher is not None and example is not None:
        summary["teacher"] = {"params": count_params(teacher),
                              "flops": int(count_flops(teacher, example).total)}
    write_json(work_dir / "search.json", {"summary": summary, "candidates": rows})
    write_text(work_dir / "search.md", _markdown(summary, rows, front, proxy) + "\n")
    if front:
        plot_front(rows, front, chosen_index, work_dir / "pareto.png", x="latency_ms",
                   y="accuracy_score", title=f"{p.strategy}: {proxy} vs latency "
                   f"({len(rows)} architectures)")
    return {"search": summary}


def _by_digest(candidates: list[Any], digest: str) -> Any:
    return next(c for c in candidates if c.digest == digest)


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _markdown(summary: dict[str, Any], rows: list[dict[str, Any]], front: list[int],
              proxy: str) -> str:
    chosen = summary["chosen"]
    lines = [f"# search.nas: {summary['strategy']} over space `{summary['space']}` "
             f"({summary['space_size']:,} architectures)", "",
             f"Evaluated {summary['evaluated']}, {summary['feasible']} within the limits "
             f"{ {k: v for k, v in summary['limits'].items() if v is not None} or 'none'}. "
             f"Chosen: `{chosen['label']}` ({chosen['params']:,} parameters, "
             f"{chosen['flops']:,} FLOPs"
             + (f", {chosen['latency_ms']:.4f} ms" if chosen["latency_ms"] is not None else "")
             + ").", ""]
    if "teacher" in summary:
        t = summary["teacher"]
        latency = summary.get("teacher_latency_ms")
        lines += [f"Teacher: {t['params']:,} parameters, {t['flops']:,} FLOPs"
                  + (f", {latency:.4f} ms (measured)" if latency else "") + ".", ""]
    names = [n for n in summary["proxies"] if n not in (proxy, "params", "flops")]
    header = ["architecture", proxy, "latency (ms)", "params", "FLOPs", *names]
    lines += ["## Pareto front (accuracy objective vs latency)" if front else
              "## Top architectures by the accuracy objective", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = front or sorted(range(len(rows)), key=lambda i: -_key(rows[i]["accuracy_score"]))[:10]
    shown = sorted(shown, key=lambda i: rows[i]["latency_ms"] or 0.0)
    for i in shown:
        r = rows[i]
        mark = " ★" if r["digest"] == chosen["digest"] else ""
        lines.append("| " + " | ".join([
            f"`{r['label']}`{mark}", _fmt(r["accuracy_score"]), _fmt(r["latency_ms"]),
            f"{r['params']:,}", f"{r['flops']:,}", *(_fmt(r["scores"].get(n)) for n in names),
        ]) + " |")
    if "robot" in summary:
        robot = summary["robot"]
        lines += ["", "RoBoT weights: " + ", ".join(f"{k} {v:+.2f}"
                                                     for k, v in robot["weights"].items()),
                  f"Queries: {len(robot['queried'])} short trainings "
                  f"({robot['exploration_queries']} in the BO stage); best val accuracy "
                  f"{max(robot['query_val_accuracy']):.4f}."]
    if "ensemble" in summary:
        lines += ["", _ensemble_line(summary["ensemble"])]
    lines += groundtruth_lines(summary.get("groundtruth", []))
    lines += ["", "Proxies are computed on one fixed training mini-batch at random init; "
              "#params and FLOPs are the baselines every proxy must beat (see bench/RESULTS.md "
              "for each proxy's rank correlation with trained accuracy)."]
    return "\n".join(lines)


def _ensemble_line(ensemble: dict[str, Any]) -> str:
    fit = ensemble.get("fit")
    how = (f"fitted on {fit['queried']} short trainings of a {ensemble['reference_pool']}-"
           f"architecture reference pool" if fit else "the prior: nothing was trained")
    return f"Accuracy objective: rank ensemble `{ensemble['ensemble']}` ({how})."


def _key(value: Any) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
