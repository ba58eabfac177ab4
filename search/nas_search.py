"""One call that searches a space for a student architecture: :func:`search_architecture`.

``slimline.nas(...)`` and the ``search.nas`` recipe stage are both this function (the stage only
wraps its result in an Artifact), and ``slimline search worker`` rebuilds the very same
objective through :func:`prepare_search`, which is why everything a search process derives
(space, proxy mini-batch, latency model, limits, the fitted ensemble) comes from the config, the
data and the seed alone.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimline.compress.methods import ProgressFactory, no_progress
from slimline.params import ParamError
from slimline.search.nas import Candidate
from slimline.search.nas_config import NasConfig, load_search_space
from slimline.search.nas_ensemble import ENSEMBLE

__all__ = ["NasResult", "SearchFailed", "SearchSetup", "prepare_search", "search_architecture"]

_log = logging.getLogger("slimline.search")

# what the search leaves in its work folder, by the key it has in NasResult.files
REPORT_FILES = {"search_json": "search.json", "search_md": "search.md",
                "pareto_plot": "pareto.png", "latency_table": "latency_table.json"}


class SearchFailed(ValueError):
    """The search ran but nothing it evaluated meets the limits (the message says what to relax)."""


@dataclass
class SearchSetup:
    """Everything a search process needs; built the same way by the stage and by workers."""

    params: NasConfig
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

        kinds = {"nsga2": optuna.samplers.NSGAIISampler, "tpe": optuna.samplers.TPESampler}
        if self.params.strategy == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return kinds[self.params.strategy](seed=seed)  # constraints: Trial.set_constraint


@dataclass
class NasResult:
    """The chosen student (freshly initialised from the seed, ready for ``slimline.distill`` or
    ``slimline.train``), every evaluated candidate, the report metrics and the files written."""

    model: nn.Module
    arch: Any
    model_spec: dict[str, Any]
    candidates: list[Candidate]
    metrics: dict[str, Any]
    work_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def prepare_search(p: NasConfig, data: Any, teacher: nn.Module | None, *, seed: int,
                   work_dir: Path, log: Callable[[str], None] = _log.info,
                   progress: ProgressFactory | None = None) -> SearchSetup:
    """Space, proxy inputs (one fixed training mini-batch), latency model, limits and, for the
    ensemble objective, its fit (``progress(total, desc)`` shows the short trainings)."""
    from slimline.search.nas import CandidateEvaluator, Limits, MeasuredLatency, TableLatency
    from slimline.search.proxies import ProxyInputs

    space = load_search_space(p.space)
    x, y = data.split("train")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(x), generator=generator)[: p.proxy_batch]
    num_classes = int(y.max()) + 1
    inputs = ProxyInputs(x=x[pick], y=y[pick], num_classes=num_classes,
                         teacher=teacher.eval() if teacher is not None else None)
    latency = None
    if p.latency == "measure":
        latency = MeasuredLatency(tuple(x.shape[1:]))
    elif p.latency == "table":
        latency = TableLatency(space, _latency_table(p, space, work_dir, log))
    limits = Limits(p.max_params, p.max_flops, p.max_latency_ms)
    if p.max_latency_ratio is not None:
        if teacher is None:
            raise ParamError("max_latency_ratio", "needs a teacher (the stage's input model)")
        teacher_ms = MeasuredLatency(tuple(x.shape[1:]), runs=200)(None, teacher)
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


def _latency_table(p: NasConfig, space: Any, work_dir: Path, log) -> Any:
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


def search_architecture(
    teacher: nn.Module | None,
    data: Any,
    config: NasConfig | None = None,
    *,
    seed: int = 0,
    work_dir: str | Path | None = None,
    study_name: str | None = None,
    worker_id: str = "main",
    log: Callable[[str], None] = _log.info,
    progress: ProgressFactory | None = None,
) -> NasResult:
    """Search ``config.space`` for the student that maximises the accuracy objective (and
    minimises latency) within the limits; see :class:`NasConfig` for every knob.

    ``teacher`` feeds the DisWOT proxies, ``max_latency_ratio`` and the report (``None`` is
    allowed when neither is used). ``work_dir`` receives ``search.json``, ``search.md``,
    ``pareto.png``, the latency table and the study journal (default: a new temporary folder,
    kept and named in the result). ``study_name`` defaults to one derived from the config and
    the seed, so a reused ``work_dir`` or storage never resumes a study of another config; with
    ``config.storage`` set to a shared URL, processes calling this with the same config, seed
    (or ``study_name``) share one study. The teacher's train/eval mode and the global random
    state are left as they were. Raises :class:`SearchFailed` when
    no evaluated architecture meets the limits, :class:`slimline.params.ParamError` when the
    config cannot apply to this space or model.
    """
    p = config or NasConfig()
    progress = progress or no_progress
    if study_name is None:
        from slimline.io import canonical_json, sha256_text

        study_name = "slimline-nas-" + sha256_text(canonical_json(
            {"config": asdict(p), "seed": seed}))[:12]
    training = teacher.training if teacher is not None else False
    try:
        with torch.random.fork_rng():
            return _search(p, teacher, data, seed=seed, work_dir=work_dir,
                           study_name=study_name, worker_id=worker_id, log=log,
                           progress=progress)
    finally:
        if teacher is not None:
            teacher.train(training)


def _search(p: NasConfig, teacher: nn.Module | None, data: Any, *, seed: int,
            work_dir: str | Path | None, study_name: str, worker_id: str,
            log: Callable[[str], None], progress: ProgressFactory) -> NasResult:
    import optuna

    from slimline.search.nas_groundtruth import groundtruth_check
    from slimline.search.report import summarise_search

    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="slimline-nas-"))
    work.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says enough
    setup = prepare_search(p, data, teacher, seed=seed, work_dir=work, log=log, progress=progress)
    if p.strategy == "robot":
        from slimline.search.nas_robot import run_robot

        candidates, chosen, extra = run_robot(setup, data, seed=seed, progress=progress)
    else:
        candidates, chosen, extra = _run_study(setup, seed=seed, work_dir=work,
                                               study_name=study_name, worker_id=worker_id,
                                               progress=progress)
    if chosen is None:
        raise SearchFailed(_nothing_feasible(setup, candidates))
    if setup.ensemble is not None:
        extra["ensemble"] = setup.ensemble.summary()
    robot_weights = extra.get("robot", {}).get("weights")
    extra["groundtruth"] = groundtruth_check(setup, data.name, p.groundtruth,
                                             robot_weights=robot_weights, log=log)
    example = data.input_spec.random(1) if teacher is not None else None
    metrics = summarise_search(setup, candidates, chosen, work, teacher=teacher,
                               example=example, extra=extra)
    torch.manual_seed(seed)
    model = setup.space.build_model(chosen.arch)
    files = {key: work / name for key, name in REPORT_FILES.items() if (work / name).is_file()}
    return NasResult(model, chosen.arch, chosen.model_spec, candidates, metrics, work, files)


def _nothing_feasible(setup: SearchSetup, candidates: list[Candidate]) -> str:
    limits = setup.limits
    fastest = min((c.latency_ms for c in candidates if c.latency_ms is not None), default=None)
    smallest = min((c.params for c in candidates), default=None)
    max_ms = "None" if limits.max_latency_ms is None else f"{limits.max_latency_ms:.4f}"
    return (f"none of the {len(candidates)} evaluated architectures meets the limits "
            f"(max_params={limits.max_params}, max_flops={limits.max_flops}, "
            f"max_latency_ms={max_ms}); the smallest had {smallest} parameters"
            + (f", the fastest {fastest:.4f} ms" if fastest is not None else "")
            + ": relax the limits, add smaller choices to the space, or raise `trials`")


def _run_study(setup: SearchSetup, *, seed: int, work_dir: Path, study_name: str,
               worker_id: str, progress: ProgressFactory):
    from slimline.search.study import completed_trials, open_study, run_worker, wait_for_study

    p = setup.params
    study = open_study(p.storage, study_name, directions=setup.directions,
                       sampler=setup.sampler(seed), default_journal=work_dir / "study.journal")
    with progress(p.trials, f"{p.strategy} search") as bar:
        def advance(done: int, total: int) -> None:
            bar.update(max(done - bar.count, 0))

        run_worker(study, setup.objective(), max_trials=p.trials, worker_id=worker_id,
                   progress=advance)
    wait_for_study(study, p.trials, timeout=p.wait_timeout_s)
    candidates = []
    for trial in completed_trials(study):
        a = trial.user_attrs
        arch = setup.space.validate(setup.space.architecture_from_dict(a["arch"]))
        candidates.append(Candidate(arch, a["digest"], setup.space.model_spec(arch), a["params"],
                                    a["flops"], a["latency_ms"], dict(a["scores"])))
    feasible = [c for c in candidates if setup.limits.feasible(c)]
    proxy = p.accuracy_proxy
    chosen = max(feasible, key=lambda c: (_finite(c.scores[proxy]), -(c.latency_ms or 0.0)),
                 default=None)
    return candidates, chosen, {"study_trials": len(study.trials)}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf
