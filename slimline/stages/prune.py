"""``prune.magnitude``: global or per-layer unstructured magnitude pruning (the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimline.artifact import Artifact
from slimline.compress.prune import layer_sparsity, magnitude_masks, prunable_weights
from slimline.compress.prune.magnitude import apply_masks
from slimline.params import check_range, check_regex, param
from slimline.stage import StageContext, register_stage


@dataclass
class MagnitudePruneParams:
    sparsity: float = param(0.5, help="fraction of prunable weights set to zero, in [0, 1)")
    scope: Literal["global", "uniform"] = param(
        "global", help="global: one threshold for all layers; uniform: same sparsity per layer")
    include: str | None = param(None, help="regex: prune only weights whose name matches")
    exclude: str | None = param(None, help="regex: keep weights whose name matches dense")

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_regex("include", self.include)
        check_regex("exclude", self.exclude)


@register_stage("prune.magnitude", MagnitudePruneParams)
def prune_magnitude(ctx: StageContext, inputs: list[Artifact],
                    p: MagnitudePruneParams) -> Artifact:
    """Unstructured magnitude pruning, global or uniform; masks kept for fine-tuning."""
    out = inputs[0].derive(copy_model=True)
    candidates = prunable_weights(out.model, p.include, p.exclude)
    if not candidates:
        every = ", ".join(prunable_weights(out.model)) or "none"
        raise ctx.fail(f"include={p.include!r} / exclude={p.exclude!r} match no prunable "
                       f"weight. Prunable weights: {every}")
    try:
        masks = magnitude_masks(out.model, p.sparsity, p.scope, include=p.include,
                                exclude=p.exclude)
    except ValueError as exc:
        raise ctx.fail(str(exc)) from None
    for name, mask in masks.items():  # compose with earlier pruning instead of undoing it
        out.masks[name] = mask & out.masks[name] if name in out.masks else mask
    apply_masks(out.model, out.masks)
    per_layer = layer_sparsity(out.model, list(candidates))
    total = sum(w.numel() for w in candidates.values())
    zeros = sum(per_layer[n] * candidates[n].numel() for n in candidates)
    out.state["pruning"] = {"method": "magnitude", "scope": p.scope, "target": p.sparsity,
                            "layer_sparsity": per_layer}
    out.metrics = {"sparsity": zeros / total, "target_sparsity": p.sparsity,
                   "layer_sparsity": per_layer}
    return out
