"""Unstructured magnitude pruning: the baseline every smarter method must beat.

``global`` ranks |w| across all prunable layers (one threshold), ``uniform`` prunes every layer to
the same sparsity. Counts are exact: ``floor(sparsity * n)`` weights are zeroed, ties broken by
position, so the achieved sparsity never drifts with repeated values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

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
from slimline.masks import apply_masks  # re-exported: pruners hand out masks
from slimline.params import check_range, check_regex, param

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GRU, nn.LSTM, nn.RNN)
# Layers known by class name, so that no optional package is imported to recognise them:
# transformers' GPT-2 ``Conv1D`` is a Linear with its weight stored (in, out).
PRUNABLE_TYPE_NAMES = frozenset({"Conv1D"})


def own_parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` as ``named_parameters()`` reports it. A weight tied to another
    module's (GPT-2's lm_head is its token embedding) appears there under that module's name
    only, so ``own_parameter_names(m).get(id(p)) != name`` marks a weight that belongs to (and
    would be pruned or quantized with) another layer."""
    return {id(p): n for n, p in model.named_parameters()}


def _prunable_parameter(module: nn.Module, param_name: str) -> bool:
    """Weights of Linear/Conv/RNN layers and the fused q/k/v projection of torch's
    ``nn.MultiheadAttention`` (``in_proj_weight``; its ``out_proj`` is a Linear)."""
    if isinstance(module, nn.MultiheadAttention):
        return param_name in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                              "v_proj_weight")
    if isinstance(module, PRUNABLE_TYPES) or type(module).__name__ in PRUNABLE_TYPE_NAMES:
        return param_name.startswith("weight")
    return False


def prunable_weights(model: nn.Module, include: str | None = None,
                     exclude: str | None = None) -> dict[str, nn.Parameter]:
    """Weight matrices/kernels of Linear, Conv and RNN layers (and of attention projections
    stored outside Linears: torch's MultiheadAttention, GPT-2's Conv1D), by parameter name.

    ``include``/``exclude`` are regular expressions searched in the parameter name
    (e.g. ``exclude: "^fc\\."`` keeps the classifier dense). Biases, norms and embeddings are
    never pruned.
    """
    found: dict[str, nn.Parameter] = {}
    canonical = own_parameter_names(model)  # tied weights are another layer's: left out
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            if not _prunable_parameter(module, param_name) or parameter.dim() < 2:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            if canonical.get(id(parameter)) != name:
                continue
            if include is not None and not re.search(include, name):
                continue
            if exclude is not None and re.search(exclude, name):
                continue
            found[name] = parameter
    return found


def _keep_mask(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Boolean mask that drops exactly the ``num_pruned`` lowest scores."""
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if num_pruned > 0:
        keep[torch.argsort(flat, stable=True)[:num_pruned]] = False
    return keep.view_as(scores)


def magnitude_masks(model: nn.Module, sparsity: float,
                    scope: Literal["global", "uniform"] = "global", *,
                    include: str | None = None, exclude: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) that zero a ``sparsity`` fraction of the prunable weights."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    weights = prunable_weights(model, include, exclude)
    if not weights:
        raise ValueError(f"no prunable weights match include={include!r} exclude={exclude!r}")
    for name, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise ValueError(f"layer {name!r} has NaN or inf weights; cannot rank magnitudes")
    if scope == "uniform":
        return {name: _keep_mask(w.detach().abs(), int(sparsity * w.numel()))
                for name, w in weights.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'uniform', got {scope!r}")
    scores = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_mask(scores, int(sparsity * scores.numel()))
    masks, offset = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[offset : offset + weight.numel()].view_as(weight).clone()
        offset += weight.numel()
    return masks


def layer_sparsity(model: nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Fraction of exact zeros per weight tensor (all prunable weights by default)."""
    parameters = dict(model.named_parameters())
    selected = names if names is not None else list(prunable_weights(model))
    return {name: float((parameters[name] == 0).sum()) / parameters[name].numel()
            for name in selected}


def magnitude(model: nn.Module, sparsity: float = 0.5,
              scope: Literal["global", "uniform"] = "global", *,
              include: str | None = None, exclude: str | None = None
              ) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place by weight magnitude; returns the keep-masks.

    >>> masks = magnitude(model, sparsity=0.5)            # global threshold
    >>> masks = magnitude(model, 0.5, scope="uniform", exclude=r"^fc\\.")
    """
    masks = magnitude_masks(model, sparsity, scope, include=include, exclude=exclude)
    apply_masks(model, masks)
    return masks


# ---- the method behind slimline.prune / the prune.magnitude stage --------------------------


@dataclass
class MagnitudeConfig(MethodConfig):
    """Unstructured magnitude pruning (the baseline), global or uniform, data-free."""

    sparsity: float = param(0.5, help="fraction of prunable weights set to zero, in [0, 1)")
    scope: Literal["global", "uniform"] = param(
        "global", help="global: one threshold for all layers; uniform: same sparsity per layer")
    include: str | None = param(None, help="regex: prune only weights whose name matches")
    exclude: str | None = param(None, help="regex: keep weights whose name matches dense")

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_regex("include", self.include)
        check_regex("exclude", self.exclude)


def candidate_weights(model: nn.Module, include: str | None,
                      exclude: str | None) -> dict[str, nn.Parameter]:
    """:func:`prunable_weights`, or a :class:`MethodError` listing them when the regexes match
    none."""
    candidates = prunable_weights(model, include, exclude)
    if not candidates:
        every = ", ".join(prunable_weights(model)) or "none"
        raise MethodError(f"include={include!r} / exclude={exclude!r} match no prunable "
                          f"weight. Prunable weights: {every}")
    return candidates


def masked_sparsity(model: nn.Module, names: list[str]) -> tuple[float, dict[str, float]]:
    """Overall and per-layer share of zeros over the weights ``names``."""
    parameters = dict(model.named_parameters())
    per_layer = layer_sparsity(model, names)
    total = sum(parameters[n].numel() for n in names)
    zeros = sum(per_layer[n] * parameters[n].numel() for n in names)
    return (zeros / total if total else 0.0), per_layer


@register_pruner(MagnitudeConfig)
def prune_magnitude(model: nn.Module, config: MagnitudeConfig,
                    inputs: MethodInputs) -> PruneResult:
    candidates = candidate_weights(model, config.include, config.exclude)
    try:
        new = magnitude_masks(model, config.sparsity, config.scope, include=config.include,
                              exclude=config.exclude)
    except ValueError as exc:
        raise MethodError(str(exc)) from None
    masks = compose_masks(inputs.masks, new)
    apply_masks(model, masks)
    sparsity, per_layer = masked_sparsity(model, list(candidates))
    record = {"method": "magnitude", "scope": config.scope, "target": config.sparsity,
              "layer_sparsity": per_layer}
    return PruneResult(model, masks, record, {"sparsity": sparsity,
                                              "target_sparsity": config.sparsity,
                                              "layer_sparsity": per_layer})
