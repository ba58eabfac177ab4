"""Unstructured magnitude pruning: the baseline every smarter method must beat.

``global`` ranks |w| across all prunable layers (one threshold), ``uniform`` prunes every layer to
the same sparsity. Counts are exact: ``floor(sparsity * n)`` weights are zeroed, ties broken by
position, so the achieved sparsity never drifts with repeated values.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn as nn

from slimline.masks import apply_masks  # re-exported: pruners hand out masks

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GRU, nn.LSTM, nn.RNN)


def prunable_weights(model: nn.Module, include: str | None = None,
                     exclude: str | None = None) -> dict[str, nn.Parameter]:
    """Weight matrices/kernels of Linear, Conv and RNN layers, by parameter name.

    ``include``/``exclude`` are regular expressions searched in the parameter name
    (e.g. ``exclude: "^fc\\."`` keeps the classifier dense). Biases and norms are never pruned.
    """
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        for param_name, parameter in module.named_parameters(recurse=False):
            if not param_name.startswith("weight") or parameter.dim() < 2:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
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
