"""N:M semi-structured sparsity (e.g. 2:4): in every group of M consecutive weights along the
input dimension, keep the N largest ``|w|`` and zero the rest.

Grouping, which is what sparse tensor cores and sparse kernels expect:

* ``Linear`` (and RNN weight matrices) ``(out, in)``: groups of M consecutive input features in
  each output row, i.e. ``w[o, g*M:(g+1)*M]``.
* ``ConvNd`` ``(out, in/groups, *kernel)``: groups of M consecutive **input channels at each
  kernel position**, i.e. ``w[o, g*M:(g+1)*M, ky, kx]`` - the layout an im2col/implicit-GEMM
  kernel with channels-last (NHWC) input reduces over, so a group is contiguous in memory there.

The input dimension (``in`` or ``in/groups``) must be divisible by M; otherwise the layer is an
error naming it, or skipped with ``on_indivisible="skip"`` (a depthwise conv has one input
channel per group and is always indivisible). Ties are broken by position (lower index kept), so
every group has exactly N non-zeros unless it already had fewer non-zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from slimline.compress.prune.magnitude import masked_sparsity, prunable_weights
from slimline.masks import apply_masks
from slimline.params import ParamError, check_regex, param

OnIndivisible = Literal["error", "skip"]


class NMError(ValueError):
    """An N:M pattern that cannot be applied (bad N/M, indivisible layer, NaN weights)."""


@dataclass
class NMResult:
    """Masks (True = kept) per weight name, and the layers left dense with the reason."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def check_pattern(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 2 or not 1 <= n < m:
        raise NMError(f"need integers 1 <= n < m and m >= 2 (e.g. 2:4, 1:4, 4:8), got {n}:{m}")


def _to_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``(..., M)`` view: input dimension moved last (after the kernel dims), split into M's."""
    if weight.dim() > 2:  # (out, in, *k) -> (out, *k, in)
        weight = weight.movedim(1, -1)
    return weight.reshape(*weight.shape[:-1], weight.shape[-1] // m, m)


def _from_groups(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        return groups.reshape(moved).movedim(-1, 1)
    return groups.reshape(shape)


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep-mask of ``weight`` with the N largest ``|w|`` of every M-group along the input dim."""
    check_pattern(n, m)
    if weight.dim() < 2:
        raise NMError(
            f"layer {name!r}: N:M needs a weight matrix or kernel, got shape {tuple(weight.shape)}"
        )
    inputs = weight.shape[1]
    if inputs % m:
        depthwise = (
            " (a depthwise conv: one input channel per group)"
            if (weight.dim() > 2 and inputs == 1)
            else ""
        )
        raise NMError(
            f"layer {name!r}: input dimension {inputs} (shape {tuple(weight.shape)}) is "
            f"not divisible by M={m}{depthwise}; exclude it or use "
            "on_indivisible='skip'"
        )
    magnitude = weight.detach().abs()
    if not torch.isfinite(magnitude).all():
        raise NMError(f"layer {name!r} has NaN or inf weights; cannot rank magnitudes")
    groups = _to_groups(magnitude, m)
    # Stable descending sort: among equal magnitudes the lower index wins.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return _from_groups(keep, weight.shape)


def nm_masks(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    *,
    include: str | None = None,
    exclude: str | None = None,
    on_indivisible: OnIndivisible = "error",
) -> NMResult:
    """N:M keep-masks for the prunable weights of ``model`` (Linear, Conv, RNN matrices).

    ``include``/``exclude`` are regexes searched in the weight name (``"^fc\\."`` ...).
    """
    check_pattern(n, m)
    if on_indivisible not in ("error", "skip"):
        raise NMError(f"on_indivisible must be 'error' or 'skip', got {on_indivisible!r}")
    candidates = prunable_weights(model, include, exclude)
    if not candidates:
        every = ", ".join(prunable_weights(model)) or "none"
        raise NMError(
            f"include={include!r} / exclude={exclude!r} match no prunable weight; "
            f"prunable weights: {every}"
        )
    result = NMResult()
    for name, weight in candidates.items():
        if weight.shape[1] % m and on_indivisible == "skip":
            result.skipped[name] = f"input dimension {weight.shape[1]} not divisible by {m}"
            continue
        result.masks[name] = nm_mask(weight, n, m, name)
    if not result.masks:
        raise NMError(
            f"no layer can take {n}:{m} sparsity: "
            + "; ".join(f"{k}: {v}" for k, v in result.skipped.items())
        )
    return result


def nm_prune(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    *,
    include: str | None = None,
    exclude: str | None = None,
    on_indivisible: OnIndivisible = "error",
) -> NMResult:
    """Apply N:M sparsity to ``model`` in place; returns the masks and skipped layers."""
    result = nm_masks(model, n, m, include=include, exclude=exclude, on_indivisible=on_indivisible)
    apply_masks(model, result.masks)
    return result


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups of ``weight`` with more than N non-zeros (0 = valid N:M)."""
    check_pattern(n, m)
    if weight.shape[1] % m:
        raise NMError(f"input dimension {weight.shape[1]} is not divisible by {m}")
    nonzero = (_to_groups(weight.detach(), m) != 0).sum(-1)
    return int((nonzero > n).sum())


# ---- the method behind slimline.prune / the prune.nm stage ---------------------------------


@dataclass
class NMConfig(MethodConfig):
    """N:M semi-structured sparsity (N largest |w| of every M consecutive input weights)."""

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


@register_pruner(NMConfig)
def prune_nm(model: nn.Module, config: NMConfig, inputs: MethodInputs) -> PruneResult:
    try:
        result = nm_masks(model, config.n, config.m, include=config.include,
                          exclude=config.exclude, on_indivisible=config.on_indivisible)
    except NMError as exc:
        raise MethodError(str(exc)) from None
    masks = compose_masks(inputs.masks, result.masks)
    apply_masks(model, masks)
    sparsity, per_layer = masked_sparsity(model, list(result.masks))
    record = {"method": "nm", "n": config.n, "m": config.m, "layer_sparsity": per_layer,
              "skipped": result.skipped}
    return PruneResult(model, masks, record, {
        "pattern": f"{config.n}:{config.m}",
        "sparsity": sparsity,
        "target_sparsity": 1 - config.n / config.m,
        "layer_sparsity": per_layer,
        "skipped": result.skipped,
    })
