"""Keep-masks of pruned weights: ``{parameter name: bool tensor}``, True where a weight stays.

Below both the pruners (:mod:`slimline.compress.prune`, which make masks) and the training loop
(:mod:`slimline.training`, which keeps masked weights at zero while fine-tuning).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["apply_masks"]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (masks map parameter names to keep-masks)."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters:
            raise KeyError(f"mask for {name!r}, but the model has no such parameter")
        parameters[name].mul_(mask.to(parameters[name].dtype))
