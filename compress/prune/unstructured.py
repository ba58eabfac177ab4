"""Layer-adaptive unstructured pruning (the ``prune.unstructured`` method): uniform, global,
LAMP, DIMAP (module-aware, weight-only) and Xu et al.'s rate-distortion DP, data-free by default.

:func:`prune_unstructured` is the whole method on a plain module: candidate weights, importance,
allocation (for ``dp``: distortion curves measured on data-free inputs, the DP of
:mod:`slimline.compress.prune.rate_distortion`, refinement and the additivity check), masks
composed with earlier pruning, and the output distortion it caused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from slimline.compress.methods import (
    MethodConfig,
    MethodError,
    MethodInputs,
    PruneResult,
    compose_masks,
    register_pruner,
)
from slimline.compress.prune.allocation import (
    keep_budget,
    masks_from_counts,
    threshold_allocation,
    uniform_allocation,
)
from slimline.compress.prune.distortion import additivity, output_distortion
from slimline.compress.prune.importance import (
    TRANSFORMER_MODULES,
    DIMAPImportance,
    LAMPImportance,
    MagnitudeImportance,
    ModuleRule,
    assign_modules,
    check_finite,
)
from slimline.compress.prune.inputs import bn_matched_inputs, has_batch_norm
from slimline.compress.prune.magnitude import candidate_weights, masked_sparsity, prunable_weights
from slimline.compress.prune.rate_distortion import rd_allocation
from slimline.evaluation import predict
from slimline.masks import apply_masks
from slimline.params import ParamError, check_range, check_regex, param

__all__ = ["UnstructuredConfig", "prune_unstructured"]

DEFAULT_MODULES = [{"name": r.name, "regex": r.regex} for r in TRANSFORMER_MODULES]


@dataclass
class UnstructuredConfig(MethodConfig):
    """Layer-adaptive unstructured pruning: uniform, global, LAMP, DIMAP or Xu et al.'s
    rate-distortion DP; data-free unless ``distortion_data`` is ``calibration``."""

    sparsity: float = param(0.5, help="fraction of the candidate weights set to zero, in [0, 1)")
    allocation: Literal["uniform", "global", "lamp", "dp"] = param(
        "dp",
        help="uniform: same sparsity per layer; global: one threshold on `score`; "
        "lamp: LAMP scores; dp: rate-distortion dynamic programme (Xu et al. 2023)",
    )
    score: Literal["magnitude", "lamp", "dimap"] = param(
        "magnitude",
        help="importance ranked by allocation=global (dimap: one threshold per "
        "module, layers outside `modules` stay dense)",
    )
    distortion_data: Literal["auto", "random", "bn", "calibration"] = param(
        "auto",
        help="inputs for measuring output distortion: random (N(0,1) features, or valid token "
        "ids for text models) or bn (synthesised to match BatchNorm statistics), both "
        "data-free; calibration (training samples); auto: bn if the model has BatchNorm, "
        "else random",
    )
    samples: int = param(64, help="inputs in the distortion batch")
    grid: int | list[float] = param(
        101, help="dp levels per layer: a count of evenly spaced fractions in [0, 1], or a list"
    )
    refine: int = param(
        3,
        help="dp: rounds re-measuring the curves around the current allocation (0: paper's "
        "one-shot DP); a round is kept only if the measured distortion drops",
    )
    window: float = param(0.1, help="dp refine: levels within this fraction of the current one")
    max_layer_sparsity: float = param(
        0.99, help="dp: no layer loses more than this fraction (an emptied layer cuts the network)"
    )
    reduction: Literal["mean", "max"] = param(
        "mean", help="distortion over samples: mean logit MSE, or the worst sample's"
    )
    additivity_samples: int = param(
        32, help="dp: random allocations for the additivity check (0: skip)"
    )
    bn_steps: int = param(200, help="optimisation steps for distortion_data=bn")
    modules: list[dict] = param(
        DEFAULT_MODULES, help="dimap modules: [{name, regex} | {name, op}] (op: layer class name)"
    )
    include: str | None = param(None, help="regex: prune only weights whose name matches")
    exclude: str | None = param(None, help="regex: keep weights whose name matches dense")

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_regex("include", self.include)
        check_regex("exclude", self.exclude)
        if self.samples < 1:
            raise ParamError("samples", f"must be at least 1, got {self.samples}")
        if self.distortion_data in ("bn", "auto") and self.samples < 2:
            raise ParamError("samples", f"distortion_data={self.distortion_data} needs at least 2")
        if self.refine < 0:
            raise ParamError("refine", f"must be >= 0, got {self.refine}")
        check_range("window", self.window, 1e-6, 1.0)
        check_range("max_layer_sparsity", self.max_layer_sparsity, 0.0, 1.0)
        if self.additivity_samples < 0 or self.additivity_samples == 1:
            raise ParamError("additivity_samples", "must be 0 (off) or at least 2")
        self.grid_levels()  # raises on a bad grid
        self.module_rules()  # raises on bad modules
        if self.score != "magnitude" and self.allocation != "global":
            raise ParamError(
                "score",
                f"score={self.score!r} only ranks layers against each "
                "other with allocation=global (inside a layer every score keeps "
                f"the largest weights); with allocation={self.allocation!r} use "
                "score=magnitude",
            )

    def uses_data(self) -> bool:
        return self.distortion_data == "calibration"

    def grid_levels(self) -> np.ndarray:
        if isinstance(self.grid, int):
            if self.grid < 2:
                raise ParamError("grid", f"needs at least 2 levels, got {self.grid}")
            return np.linspace(0.0, 1.0, self.grid)
        levels = np.asarray(self.grid, dtype=np.float64)
        if levels.size < 1 or ((levels < 0) | (levels > 1)).any() or (np.diff(levels) <= 0).any():
            raise ParamError(
                "grid", f"levels must increase strictly within [0, 1], got {self.grid}"
            )
        return levels

    def module_rules(self) -> list[ModuleRule]:
        rules, seen = [], set()
        for i, entry in enumerate(self.modules):
            unknown = set(entry) - {"name", "regex", "op"}
            if unknown or "name" not in entry:
                raise ParamError(
                    f"modules[{i}]", f"expected {{name, regex}} or {{name, op}}, got {entry!r}"
                )
            if entry["name"] in seen:
                raise ParamError(f"modules[{i}]", f"duplicate module name {entry['name']!r}")
            seen.add(entry["name"])
            try:
                rules.append(ModuleRule(str(entry["name"]), entry.get("regex"), entry.get("op")))
            except ValueError as exc:
                raise ParamError(f"modules[{i}]", str(exc)) from None
        if self.score == "dimap" and not rules:
            raise ParamError("modules", "score=dimap needs at least one module")
        return rules


@register_pruner(UnstructuredConfig)
def prune_unstructured(
    model: nn.Module, config: UnstructuredConfig, inputs: MethodInputs
) -> PruneResult:
    """Prune ``model`` in place (see the module docstring); ``inputs.example_input`` gives the
    input shape of the data-free distortion batch."""
    p = config
    apply_masks(model, inputs.masks)  # earlier pruning stays: those weights count as pruned
    candidates = candidate_weights(model, p.include, p.exclude)
    module_of: dict[str, str] = {}
    if p.score == "dimap":
        try:
            module_of = assign_modules(model, list(candidates), p.module_rules())
        except ValueError as exc:
            raise MethodError(str(exc)) from None
        candidates = {n: w for n, w in candidates.items() if n in module_of}
    weights = {n: w.detach() for n, w in candidates.items()}
    try:
        check_finite(weights)
    except ValueError as exc:
        raise MethodError(str(exc)) from None

    distortion_inputs, data_kind = distortion_batch(model, p, inputs)
    reference = predict(model, distortion_inputs)  # the model as it came in (old masks on)
    metrics: dict[str, Any] = {}
    record: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    magnitude = MagnitudeImportance(p=1)(weights)
    total = sum(w.numel() for w in weights.values())
    budget = keep_budget(total, p.sparsity)
    if p.allocation == "uniform":
        counts = uniform_allocation(weights, p.sparsity)
    elif p.allocation == "lamp" or p.score == "lamp":
        counts = threshold_allocation(LAMPImportance()(weights), p.sparsity)
    elif p.score == "dimap":
        counts = threshold_allocation(DIMAPImportance(module_of)(weights), p.sparsity)
    elif p.allocation == "global":
        counts = threshold_allocation(magnitude, p.sparsity)
    else:
        counts = _dp(model, p, inputs, list(weights), distortion_inputs, budget, metrics,
                     record, extras)
    new = masks_from_counts(magnitude, counts)
    if p.score == "dimap":
        pruned = {n: ~m for n, m in new.items()}
        record["modules"] = {
            m: [n for n in weights if module_of[n] == m] for m in dict.fromkeys(module_of.values())
        }
        record["module_thresholds"] = DIMAPImportance(module_of).module_thresholds(weights, pruned)

    masks = compose_masks(inputs.masks, new)
    apply_masks(model, masks)
    pruned_output = predict(model, distortion_inputs)
    sparsity, per_layer = masked_sparsity(model, list(weights))
    all_prunable = prunable_weights(model)
    all_zeros = sum(int((w == 0).sum()) for w in all_prunable.values())
    metrics.update(
        {
            "sparsity": sparsity,
            "target_sparsity": p.sparsity,
            "sparsity_all_prunable": all_zeros / sum(w.numel() for w in all_prunable.values()),
            "layer_sparsity": per_layer,
            "distortion": output_distortion(pruned_output, reference, p.reduction),
            "distortion_data": data_kind,
        }
    )
    record = {
        "method": "unstructured",
        "allocation": p.allocation,
        "score": p.score,
        "target": p.sparsity,
        "budget_kept": budget,
        "layer_sparsity": per_layer,
        **record,
    }
    return PruneResult(model, masks, record, metrics, extras)


def distortion_batch(
    model: nn.Module, p: UnstructuredConfig, inputs: MethodInputs
) -> tuple[torch.Tensor, str]:
    """The inputs output distortion is measured on, and which kind they are (``auto``
    resolved): BN-matched or N(0,1) synthetic inputs (data-free), or calibration samples."""
    kind = p.distortion_data
    if kind == "auto":
        kind = "bn" if has_batch_norm(model) else "random"
    if kind == "calibration":
        data = inputs.require_data("distortion_data=calibration")
        return data.calibration(p.samples, seed=inputs.seed), kind
    if kind == "bn":
        input_shape = tuple(inputs.require_example("prune.unstructured").shape[1:])
        try:
            batch = bn_matched_inputs(model, input_shape, p.samples, steps=p.bn_steps,
                                      seed=inputs.seed)
        except ValueError as exc:
            raise MethodError(f"distortion_data=bn: {exc}") from None
        return batch, kind
    return inputs.synthetic(p.samples, "prune.unstructured"), kind


def _dp(
    model: nn.Module,
    p: UnstructuredConfig,
    inputs: MethodInputs,
    names: list[str],
    distortion_inputs: torch.Tensor,
    budget: int,
    metrics: dict[str, Any],
    record: dict[str, Any],
    extras: dict[str, Any],
) -> dict[str, int]:
    """Curves, DP, refinement and the additivity check; fills metrics/record/extras, returns
    the kept weights per layer."""
    levels = p.grid_levels()
    with inputs.progress(len(names), "distortion curves") as bar:
        try:
            result = rd_allocation(
                model,
                names,
                distortion_inputs,
                budget,
                levels=levels,
                reduction=p.reduction,
                refine=p.refine,
                window=p.window,
                max_level=p.max_layer_sparsity,
                progress=bar.update,
            )
        except ValueError as exc:
            raise MethodError(
                f"{exc} (sparsity={p.sparsity}, highest grid level {levels.max():.2f}; "
                "add higher levels to `grid`)"
            ) from None
    metrics.update(
        {
            "predicted_distortion": result.predicted,
            "dp_distortion_rounds": [r["measured"] for r in result.rounds],
            **{f"{k}_seconds": v for k, v in result.seconds.items()},
        }
    )
    if p.additivity_samples:
        check = additivity(
            model,
            result.curves,
            distortion_inputs,
            samples=p.additivity_samples,
            seed=inputs.seed,
            reduction=p.reduction,
        )
        metrics["additivity"] = check.pearson
        record["additivity"] = check.as_dict()
    record["dp"] = {"rounds": result.rounds, "grid": levels.tolist()}
    curves = result.curves
    extras["distortion_curves"] = {
        "names": curves.names,
        "levels": levels.tolist(),
        "distortion": curves.distortion.tolist(),
        "kept": curves.kept.tolist(),
    }
    return result.counts
