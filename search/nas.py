"""Training-free architecture search: candidates, their costs, and the Optuna objectives.

One :class:`CandidateEvaluator` turns an architecture of a search space into what a search
compares: zero-cost proxy scores (:mod:`slimline.search.proxies`), parameters, FLOPs and latency
(predicted from a block lookup table, :mod:`slimline.export.lut`, or measured on the spot with
onnxruntime). Strategies built on it:

* ``nsga2`` / ``tpe`` / ``random``: an Optuna study over the space's choices, maximising one
  accuracy proxy and (optionally) minimising latency, with parameter / FLOPs / latency limits as
  Optuna constraints. The study can live at any storage URL so that extra
  ``slimline search worker`` processes, on this machine or others, add throughput
  (:mod:`slimline.search.study`).
* ``robot``: RoBoT (:mod:`slimline.search.robot`) over a sampled pool, whose queries are short trainings.

Evaluation is deterministic given the architecture and the seed (a fresh seeded model per
proxy), so equal architectures get equal scores in every worker.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
import torch.nn as nn

from slimline.compress.prune.flops import count_flops, count_params

__all__ = [
    "Candidate",
    "CandidateEvaluator",
    "Limits",
    "MeasuredLatency",
    "TableLatency",
    "arch_from_params",
    "space_choices",
    "study_objective",
]


class LatencyModel(Protocol):
    def __call__(self, arch: Any, model: nn.Module) -> float: ...


def space_choices(space: Any) -> dict[str, list[Any]]:
    """Flat ``{parameter name: options}`` for an Optuna trial to choose from."""
    if not hasattr(space, "trial_choices"):
        raise ValueError(f"space {space.name!r} ({type(space).__name__}) has no fixed set of "
                         "choices for a study (a union of families?); use strategy: robot, "
                         "or one search stage per family")
    return {name: list(options) for name, options in space.trial_choices().items()}


def arch_from_params(space: Any, params: Mapping[str, Any]) -> Any:
    """The architecture a trial's chosen parameters describe (inverse of :func:`space_choices`)."""
    return space.from_trial_choices(params)


@dataclass
class Limits:
    """Hard limits a chosen architecture must meet (``None`` = no limit)."""

    max_params: float | None = None
    max_flops: float | None = None
    max_latency_ms: float | None = None
    teacher_latency_ms: float | None = None  # what a relative latency limit was taken from

    def named_violations(self, candidate: Candidate) -> dict[str, float]:
        """Optuna's constraint convention: one value per limit set, feasible when all are <= 0
        (relative excess, so limits of different units weigh alike)."""
        out = {}
        for name, limit, value in (("max_params", self.max_params, candidate.params),
                                   ("max_flops", self.max_flops, candidate.flops),
                                   ("max_latency_ms", self.max_latency_ms, candidate.latency_ms)):
            if limit is not None:
                out[name] = (value - limit) / limit if value is not None else math.inf
        return out

    def violations(self, candidate: Candidate) -> list[float]:
        return list(self.named_violations(candidate).values())

    def feasible(self, candidate: Candidate) -> bool:
        return all(v <= 0 for v in self.violations(candidate))


@dataclass
class Candidate:
    """One evaluated architecture."""

    arch: Any
    digest: str
    model_spec: dict[str, Any]
    params: int
    flops: int
    latency_ms: float | None
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch.to_dict(), "digest": self.digest, "label": str(self.arch),
                "params": self.params, "flops": self.flops, "latency_ms": self.latency_ms,
                "scores": dict(self.scores), "seconds": self.seconds}


class TableLatency:
    """Latency predicted from a block lookup table: ``overhead + sum(block entries)``."""

    def __init__(self, space: Any, table: Any):
        self.space, self.table = space, table

    def __call__(self, arch: Any, model: nn.Module) -> float:
        return float(self.table.predict(self.space.block_keys(arch)))


class MeasuredLatency:
    """Latency measured on the spot: export the candidate to ONNX, median of ``runs`` timed
    onnxruntime runs at batch 1 on ``threads`` threads (seconds per candidate, not ms)."""

    def __init__(self, input_shape: Sequence[int], *, runs: int = 50, threads: int = 1):
        self.input_shape, self.runs, self.threads = tuple(input_shape), runs, threads

    def __call__(self, arch: Any, model: nn.Module) -> float:
        from slimline.export.latency import profile_onnx
        from slimline.export.onnx_export import export_onnx

        with tempfile.TemporaryDirectory(prefix="slimline-nas-") as tmp:
            path = export_onnx(model, torch.randn(1, *self.input_shape), Path(tmp) / "m.onnx")
            report = profile_onnx(path, runs=self.runs, warmup=5, intra_op_threads=self.threads,
                                  check_int8=False)
        return float(report.batch(1).median_ms)


class CandidateEvaluator:
    """Scores architectures of ``space`` (cached per architecture digest)."""

    def __init__(self, space: Any, proxies: Sequence[str], inputs: Any, *,
                 latency: LatencyModel | None = None, seed: int = 0):
        """Proxies that cannot score this space's models (e.g. ``hidden_cov`` on a CNN, DisWOT
        without a teacher) are left out and listed in ``skipped``."""
        from slimline.search.proxies import get_proxy

        self.space, self.inputs = space, inputs
        probe = space.build_model(space.sample(1, seed=seed)[0])
        self.proxies, self.skipped = [], {}
        for name in proxies:
            proxy = get_proxy(name)  # unknown names fail here, before any work
            if proxy.needs_teacher and inputs.teacher is None:
                self.skipped[name] = "needs a teacher"
            elif not proxy.applicable(probe):
                self.skipped[name] = f"does not apply to {type(probe).__name__}"
            else:
                self.proxies.append(name)
        self.latency, self.seed = latency, seed
        self.cache: dict[str, Candidate] = {}
        # Scores computed from the proxy scores (e.g. the fitted ensemble objective), by name.
        self.derived: dict[str, Callable[[dict[str, float]], float]] = {}

    def build(self, arch: Any) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.space.build_model(arch)

    def __call__(self, arch: Any) -> Candidate:
        import time

        from slimline.search.proxies import score_architecture

        digest = arch.digest
        if digest in self.cache:
            return self.cache[digest]
        start = time.perf_counter()
        model = self.build(arch).eval()
        example = torch.zeros(1, *self.inputs.x.shape[1:])
        candidate = Candidate(
            arch=arch, digest=digest, model_spec=self.space.model_spec(arch),
            params=count_params(model), flops=int(count_flops(model, example).total),
            latency_ms=self.latency(arch, model) if self.latency is not None else None,
        )
        candidate.scores = score_architecture(lambda: self.build(arch), self.proxies,
                                              self.inputs, seed=self.seed)
        for name, derive in self.derived.items():
            candidate.scores[name] = derive(candidate.scores)
        candidate.seconds = time.perf_counter() - start
        self.cache[digest] = candidate
        return candidate


def study_objective(
    space: Any, evaluator: CandidateEvaluator, accuracy_proxy: str, *, minimise_latency: bool,
    limits: Limits,
) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    """An Optuna objective: the trial picks one option per choice; returns the accuracy proxy
    (maximised) and, with ``minimise_latency``, the latency in ms. The candidate, its costs and
    its limit violations are stored as trial user attributes (so any process can read them)."""
    choices = space_choices(space)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        params = {name: trial.suggest_categorical(name, options)
                  for name, options in choices.items()}
        try:
            arch = arch_from_params(space, params)
        except ValueError as exc:  # e.g. a ViT width the head count does not divide
            trial.set_user_attr("invalid", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        candidate = evaluator(arch)
        record = candidate.to_dict()
        for key in ("arch", "digest", "label", "params", "flops", "latency_ms", "scores"):
            trial.set_user_attr(key, record[key])
        violations = limits.named_violations(candidate)
        trial.set_user_attr("constraints", list(violations.values()))
        for name, value in violations.items():  # what NSGA-II and TPE rank feasibility by
            trial.set_constraint(name, value)
        score = candidate.scores[accuracy_proxy]
        if math.isnan(score):  # a proxy that broke down (e.g. overflow) ranks last, not FAIL
            score = -math.inf
        if minimise_latency:
            return score, float(candidate.latency_ms)
        return score

    return objective
