"""What ``search.nas`` and :func:`slimline.nas` are asked to do: :class:`NasConfig`, the schema of
the recipe stage and the config of the Python call (one dataclass, so they cannot drift).

Kept apart from the search itself so that registering the stage (every CLI start) imports no
torch or Optuna; validation parses the space, so a bad space fails at ``slimline validate`` with
its recipe line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slimline.params import ParamError, param
from slimline.search.ensemble import DEFAULT_MEMBERS as ENSEMBLE_MEMBERS
from slimline.search.nas_ensemble import ENSEMBLE

__all__ = ["DEFAULT_PROXIES", "NasConfig", "load_search_space"]

# What bench/bench_proxies.py ranks best on our ground truth, plus the cheap baselines; the
# ones that do not apply to a space's models are skipped (e.g. naswot without ReLUs).
DEFAULT_PROXIES = ["snip", "synflow", "grad_norm", "naswot", "zen", "diswot_relation", "params",
                   "flops"]


@dataclass
class NasConfig:
    """A training-free, latency-aware architecture search: the space, the strategy, the
    accuracy objective, the latency model and the limits (see docs/search.md)."""

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
    from slimline.search.space import default_space
    from slimline.search.space_loading import load_space, space_from_dict

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
