"""``prune.nm``: N:M semi-structured sparsity (2:4, 1:4, 4:8), masks kept for fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimline.artifact import Artifact
from slimline.compress.prune.magnitude import apply_masks, layer_sparsity
from slimline.compress.prune.nm import NMError, nm_masks
from slimline.params import ParamError, check_regex, param
from slimline.stage import StageContext, register_stage


@dataclass
class NMPruneParams:
    n: int = param(2, help="weights kept in every group of m")
    m: int = param(4, help="group size: consecutive weights along the input (channel) dimension")
    include: str | None = param(None, help="regex: prune only weights whose name matches")
    exclude: str | None = param(None, help="regex: keep weights whose name matches dense")
    on_indivisible: Literal["error", "skip"] = param(
        "error", help="a layer whose input dimension is not a multiple of m: error or keep dense"
    )

    def __post_init__(self) -> None:
        if self.m < 2:
            raise ParamError("m", f"must be at least 2, got {self.m}")
        if not 1 <= self.n < self.m:
            raise ParamError("n", f"must be in [1, m) = [1, {self.m}), got {self.n}")
        check_regex("include", self.include)
        check_regex("exclude", self.exclude)


@register_stage("prune.nm", NMPruneParams)
def prune_nm(ctx: StageContext, inputs: list[Artifact], p: NMPruneParams) -> Artifact:
    """N:M sparsity (N largest |w| per M input weights); masks kept so `train` preserves them."""
    out = inputs[0].derive(copy_model=True)
    try:
        result = nm_masks(
            out.model,
            p.n,
            p.m,
            include=p.include,
            exclude=p.exclude,
            on_indivisible=p.on_indivisible,
        )
    except NMError as exc:
        raise ctx.fail(str(exc)) from None
    for name, mask in result.masks.items():  # compose with earlier pruning instead of undoing it
        out.masks[name] = mask & out.masks[name] if name in out.masks else mask
    apply_masks(out.model, out.masks)
    per_layer = layer_sparsity(out.model, list(result.masks))
    sizes = {name: mask.numel() for name, mask in result.masks.items()}
    total = sum(sizes.values())
    sparsity = sum(per_layer[name] * sizes[name] for name in sizes) / total
    previous = out.state.get("pruning")
    out.state["pruning"] = {
        "method": "nm",
        "n": p.n,
        "m": p.m,
        "layer_sparsity": per_layer,
        "skipped": result.skipped,
        **({"previous": previous} if previous else {}),
    }
    out.metrics = {
        "pattern": f"{p.n}:{p.m}",
        "sparsity": sparsity,
        "target_sparsity": 1 - p.n / p.m,
        "layer_sparsity": per_layer,
        "skipped": result.skipped,
    }
    return out
