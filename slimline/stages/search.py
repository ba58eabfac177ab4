"""``search.nas``: training-free, latency-aware search for a student architecture.

The input artifact is the trained teacher (used by the DisWOT proxies and as the yardstick in
the report). The output is the chosen student, freshly initialised, ready for ``distill`` or
``train``. Strategies: ``nsga2`` (default), ``tpe`` and ``random`` run an Optuna study over the
space (accuracy proxy up, latency down, limits as constraints), which extra processes can join
with ``slimline search worker`` when ``storage`` is a shared URL; ``robot`` combines several
proxies with RoBoT and spends ``query_budget`` short trainings. The stage folder gets
``search.json`` (every evaluated candidate), ``search.md`` and ``pareto.png``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slimline.artifact import Artifact
from slimline.params import ParamError, param
from slimline.search.ensemble import DEFAULT_MEMBERS as ENSEMBLE_MEMBERS
from slimline.search.nas_ensemble import ENSEMBLE
from slimline.stage import StageContext, register_stage

# What bench/bench_proxies.py ranks best on our ground truth, plus the cheap baselines; the
# ones that do not apply to a space's models are skipped (e.g. naswot without ReLUs).
DEFAULT_PROXIES = ["snip", "synflow", "grad_norm", "naswot", "zen", "diswot_relation", "params",
                   "flops"]


@dataclass
class NasParams:
    space: str | dict[str, Any] = param(
        "default", help="search space: a mapping (family, stages/choices; see docs/search.md), "
        "a YAML file, or 'default' (the digits ResNet-style space)")
    strategy: Literal["nsga2", "tpe", "random", "robot"] = param(
        "nsga2", help="nsga2/tpe/random: Optuna study over the space; robot: RoBoT over a pool")
    trials: int = param(40, help="nsga2/tpe/random: architectures the study evaluates in all "
                        "(over every worker)")
    accuracy_proxy: str = param(
        "ensemble", help="nsga2/tpe/random: the accuracy objective maximised: 'ensemble' (a "
        "rank ensemble of ensemble_members fitted on ensemble_queries short trainings; "
        "docs/search.md) or one zero-cost proxy (bench/RESULTS.md ranks them)")
    ensemble_members: list[str] = param(
        list(ENSEMBLE_MEMBERS), help="accuracy_proxy ensemble: the proxies it may combine "
        "(those that do not apply to the space are left out)")
    ensemble_queries: int = param(
        20, help="accuracy_proxy ensemble: short trainings (query_epochs each) the ensemble is "
        "fitted on; 0 trains nothing and keeps the prior (#params)")
    ensemble_pool: int = param(
        100, help="accuracy_proxy ensemble: sampled architectures the members' percentile ranks "
        "are taken within (the queries are drawn from it)")
    groundtruth: str = param(
        "auto", help="ground-truth table whose Kendall tau the report shows for the objective "
        "and #params: auto (a table in tests/fixtures/nas covering the space), none, or a "
        "table name or path")
    proxies: list[str] = param(
        DEFAULT_PROXIES, help="proxies computed for every candidate (robot combines these)")
    latency: Literal["table", "measure", "none"] = param(
        "table", help="second objective: table (block lookup table of slimline.export.lut, CNN spaces; "
        "measured here once unless latency_table is given), measure (export + onnxruntime per "
        "candidate), none (single objective)")
    latency_table: str | None = param(None, help="block lookup table JSON from "
                                      "`slimline profile lut` (e.g. measured on the target)")
    max_params: float | None = param(None, help="limit: parameters")
    max_flops: float | None = param(None, help="limit: FLOPs per sample")
    max_latency_ms: float | None = param(None, help="limit: latency (ms, batch 1)")
    max_latency_ratio: float | None = param(
        None, help="limit: latency as a fraction of the teacher's (measured here with "
        "onnxruntime, batch 1, 1 thread): a budget that holds on any machine")
    query_budget: int = param(10, help="robot: short trainings (distinct architectures queried)")
    pool_size: int = param(100, help="robot: architectures sampled and scored by the proxies")
    query_epochs: int = param(3, help="robot and the ensemble fit: epochs of each short "
                              "training (val accuracy)")
    proxy_batch: int = param(64, help="training samples in the proxies' mini-batch")
    storage: str | None = param(
        None, help="Optuna storage URL shared with `slimline search worker` processes "
        "(postgresql://..., journal file path); default: a journal file in the stage folder")
    wait_timeout_s: float = param(1800.0, help="how long to wait for other workers' trials")

    def __post_init__(self) -> None:
        load_search_space(self.space)  # a bad space fails at validation, with its line
        for name in ("trials", "query_budget", "pool_size", "query_epochs", "proxy_batch",
                     "ensemble_pool"):
            if getattr(self, name) < 1:
                raise ParamError(name, f"must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.ensemble_queries <= self.ensemble_pool:
            raise ParamError("ensemble_queries", f"must be between 0 and ensemble_pool "
                             f"({self.ensemble_pool}), got {self.ensemble_queries}")
        if self.strategy != "robot" and self.accuracy_proxy == ENSEMBLE:
            from slimline.search.proxies import list_proxies

            unknown = [m for m in self.ensemble_members if m not in list_proxies()]
            if unknown or not self.ensemble_members:
                raise ParamError("ensemble_members", f"unknown proxy {unknown[0]!r}" if unknown
                                 else "needs at least one proxy")
            self.proxies = [*self.proxies,
                            *(m for m in self.ensemble_members if m not in self.proxies)]
        elif self.strategy != "robot" and self.accuracy_proxy not in self.proxies:
            self.proxies = [*self.proxies, self.accuracy_proxy]
        if self.latency_table is not None and self.latency != "table":
            raise ParamError("latency_table", "is only used with latency: table")
        for name in ("max_latency_ms", "max_latency_ratio"):
            if getattr(self, name) is not None and self.latency == "none":
                raise ParamError(name, "needs a latency model (latency: table|measure)")
        if self.max_latency_ms is not None and self.max_latency_ratio is not None:
            raise ParamError("max_latency_ratio", "give max_latency_ms or max_latency_ratio, "
                             "not both")
        if self.strategy == "robot" and self.query_budget > self.pool_size:
            raise ParamError("query_budget", f"{self.query_budget} exceeds pool_size "
                             f"{self.pool_size}")


def load_search_space(reference: str | dict[str, Any]) -> Any:
    from slimline.search.space import default_space, load_space, space_from_dict

    if isinstance(reference, dict):
        try:
            return space_from_dict(reference)
        except ValueError as exc:
            raise ParamError("space", str(exc)) from None
    if reference == "default":
        return default_space()
    if not Path(reference).is_file():
        raise ParamError("space", f"no such file {reference!r} (give a YAML path relative to "
                         f"{os.getcwd()}, or 'default')")
    try:
        return load_space(reference)
    except ValueError as exc:
        raise ParamError("space", str(exc)) from None


@dataclass
class SearchSetup:
    """Everything a search process needs; built the same way by the stage and by workers."""

    params: NasParams
    space: Any
    evaluator: Any
    limits: Any
    directions: list[str]
    ensemble: Any = None  # the fitted EnsembleObjective when accuracy_proxy is 'ensemble'

    def objective(self):
        from slimline.search.nas import study_objective

        return study_objective(self.space, self.evaluator, self.params.accuracy_proxy,
                               minimise_latency=len(self.directions) == 2, limits=self.limits)

    def sampler(self, seed: int):
        import optuna

        from slimline.search.nas import trial_constraints

        kinds = {"nsga2": optuna.samplers.NSGAIISampler, "tpe": optuna.samplers.TPESampler}
        if self.params.strategy == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return kinds[self.params.strategy](seed=seed, constraints_func=trial_constraints)


def prepare_search(p: NasParams, data: Any, teacher: Artifact | None, *, seed: int,
                   work_dir: Path, log=print, progress=None) -> SearchSetup:
    """Space, proxy inputs (one fixed training mini-batch), latency model, limits and, for the
    ensemble objective, its fit (``progress(total, desc)`` shows the short trainings)."""
    import torch

    from slimline.search.nas import CandidateEvaluator, Limits, MeasuredLatency, TableLatency
    from slimline.search.proxies import ProxyInputs

    space = load_search_space(p.space)
    x, y = data.split("train")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(x), generator=generator)[: p.proxy_batch]
    num_classes = int(y.max()) + 1
    inputs = ProxyInputs(x=x[pick], y=y[pick], num_classes=num_classes,
                         teacher=teacher.model.eval() if teacher is not None else None)
    latency = None
    if p.latency == "measure":
        latency = MeasuredLatency(tuple(x.shape[1:]))
    elif p.latency == "table":
        latency = TableLatency(space, _latency_table(p, space, work_dir, log))
    limits = Limits(p.max_params, p.max_flops, p.max_latency_ms)
    if p.max_latency_ratio is not None:
        if teacher is None:
            raise ParamError("max_latency_ratio", "needs a teacher (the stage's input model)")
        teacher_ms = MeasuredLatency(tuple(x.shape[1:]), runs=200)(None, teacher.model)
        limits.max_latency_ms = p.max_latency_ratio * teacher_ms
        limits.teacher_latency_ms = teacher_ms
        log(f"latency limit {limits.max_latency_ms:.4f} ms = {p.max_latency_ratio} x the "
            f"teacher's {teacher_ms:.4f} ms")
    evaluator = CandidateEvaluator(space, p.proxies, inputs, latency=latency, seed=seed)
    if evaluator.skipped:
        log("proxies left out: " + ", ".join(f"{k} ({v})" for k, v in evaluator.skipped.items()))
    objective_proxy = p.accuracy_proxy if p.strategy != "robot" else None
    if objective_proxy is not None and objective_proxy in evaluator.skipped:
        raise ParamError("accuracy_proxy", f"{objective_proxy!r} "
                         f"{evaluator.skipped[objective_proxy]} in space {space.name!r}")
    ensemble = None
    if objective_proxy == ENSEMBLE:
        from slimline.search.nas_ensemble import calibrate_ensemble

        members = [m for m in p.ensemble_members if m in evaluator.proxies]
        ensemble = calibrate_ensemble(space, inputs, data, members, pool_size=p.ensemble_pool,
                                      queries=p.ensemble_queries, query_epochs=p.query_epochs,
                                      seed=seed, log=log, progress=progress)
        evaluator.derived[ENSEMBLE] = ensemble
    directions = ["maximize"] + (["minimize"] if p.latency != "none" else [])
    return SearchSetup(p, space, evaluator, limits, directions, ensemble)


def _latency_table(p: NasParams, space: Any, work_dir: Path, log) -> Any:
    from slimline.export.lut import LatencyTable, measure_lut
    from slimline.export.lut_blocks import export_space_blocks

    if not hasattr(space, "distinct_blocks"):
        raise ParamError("latency", f"space {space.name!r} has no block decomposition for a "
                         "lookup table; use latency: measure")
    if p.latency_table is not None:
        return LatencyTable.load(p.latency_table)
    log(f"measuring a block latency table for space {space.name!r} (1 thread, batch 1)")
    with tempfile.TemporaryDirectory(prefix="slimline-lut-") as blocks:
        export_space_blocks(space, blocks)
        table = measure_lut(blocks, runs=60, rounds=10)
    table.save(work_dir / "latency_table.json")  # the table is kept; the block files are not
    return table


@register_stage("search.nas", NasParams)
def search_nas(ctx: StageContext, inputs: list[Artifact], p: NasParams) -> Artifact:
    import optuna

    from slimline.search.report import summarise_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar says enough
    teacher = inputs[0]
    setup = prepare_search(p, ctx.data, teacher, seed=ctx.seed, work_dir=ctx.work_dir,
                           log=ctx.log, progress=ctx.progress)
    if p.strategy == "robot":
        from slimline.search.nas_robot import run_robot

        candidates, chosen, extra = run_robot(setup, ctx)
    else:
        candidates, chosen, extra = _run_study(setup, ctx)
    if chosen is None:
        limits = setup.limits
        fastest = min((c.latency_ms for c in candidates if c.latency_ms is not None),
                      default=None)
        smallest = min((c.params for c in candidates), default=None)
        raise ctx.fail(
            f"none of the {len(candidates)} evaluated architectures meets the limits "
            f"(max_params={limits.max_params}, max_flops={limits.max_flops}, max_latency_ms="
            f"{_fmt_ms(limits.max_latency_ms)}); the smallest had {smallest} parameters"
            + (f", the fastest {fastest:.4f} ms" if fastest is not None else "")
            + ": relax the limits, add smaller choices to the space, or raise `trials`")
    if setup.ensemble is not None:
        extra["ensemble"] = setup.ensemble.summary()
    from slimline.search.nas_groundtruth import groundtruth_check

    robot_weights = extra.get("robot", {}).get("weights")
    extra["groundtruth"] = groundtruth_check(setup, ctx.data.name, p.groundtruth,
                                             robot_weights=robot_weights, log=ctx.log)
    metrics = summarise_search(setup, candidates, chosen, ctx.work_dir, teacher=teacher,
                               extra=extra)
    import torch

    torch.manual_seed(ctx.seed)
    model = setup.space.build_model(chosen.arch)
    out = Artifact(model=model, model_spec=chosen.model_spec,
                   input_shape=tuple(teacher.input_shape), metrics=metrics,
                   history=list(teacher.history))
    for key, name in (("search_json", "search.json"), ("search_md", "search.md"),
                      ("pareto_plot", "pareto.png"), ("latency_table", "latency_table.json")):
        if (ctx.work_dir / name).is_file():
            out.files[key] = ctx.work_dir / name
    return out


def _run_study(setup: SearchSetup, ctx: StageContext):
    from slimline.search.nas import Candidate
    from slimline.search.study import completed_trials, open_study, run_worker, wait_for_study

    p = setup.params
    study = open_study(p.storage, study_name(ctx.stage_id, ctx.cache_key),
                       directions=setup.directions, sampler=setup.sampler(ctx.seed),
                       default_journal=ctx.work_dir / "study.journal")
    with ctx.progress(p.trials, f"{p.strategy} search") as bar:
        def advance(done: int, total: int) -> None:
            bar.update(max(done - bar.count, 0))

        run_worker(study, setup.objective(), max_trials=p.trials,
                   worker_id=f"stage-{ctx.stage_id}", progress=advance)
    wait_for_study(study, p.trials, timeout=p.wait_timeout_s)
    candidates = []
    for trial in completed_trials(study):
        a = trial.user_attrs
        arch = setup.space.validate(_arch_from_dict(setup.space, a["arch"]))
        candidates.append(Candidate(arch, a["digest"], setup.space.model_spec(arch), a["params"],
                                    a["flops"], a["latency_ms"], dict(a["scores"])))
    feasible = [c for c in candidates if setup.limits.feasible(c)]
    proxy = p.accuracy_proxy
    chosen = max(feasible, key=lambda c: (_finite(c.scores[proxy]),
                                          -(c.latency_ms or 0.0)), default=None)
    return candidates, chosen, {"study_trials": len(study.trials)}


def _fmt_ms(value: float | None) -> str:
    return "None" if value is None else f"{value:.4f}"


def _arch_from_dict(space: Any, data: dict) -> Any:
    if hasattr(space, "architecture_from_dict"):
        return space.architecture_from_dict(data)
    from slimline.search.space import Architecture

    return Architecture.from_dict(data)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def study_name(stage_id: str, cache_key: str) -> str:
    """Tied to the stage's cache key: changing the recipe starts a new study."""
    return f"slimline-{stage_id}-{cache_key[:12]}" if cache_key else f"slimline-{stage_id}"
