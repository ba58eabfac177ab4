"""PDP: parameter-free differentiable pruning (Cho et al., NeurIPS 2023, "PDP: Parameter-free
Differentiable Pruning is All You Need").

Each forward, per layer, with the layer's current target sparsity ``r``:

* threshold ``t`` = midpoint between the smallest kept and the largest pruned score (sec. 3,
  eq. 2), where the score is ``|w|`` (unstructured), the L2 norm of an output channel
  (``channel``) or ``|w|`` inside each group of M consecutive inputs (``nm``: t between the N-th
  and (N+1)-th largest of the group);
* soft mask ``m = softmax([t²/τ, w²/τ])[1] = sigmoid((w² − t²)/τ)`` (eq. 3), forward uses
  ``m · w`` (eq. 4). ``m(t) = 0.5`` exactly; the hard mask at the end is ``m ≥ 0.5``.

No parameters are added: the mask is a ``torch.nn.utils.parametrize`` function of the weight.
Choices this implementation makes (the paper leaves them open or uses absolute values):

* ``τ`` is relative: ``τ_abs = tau · mean(score²)`` of the layer (detached), so one ``tau`` fits
  layers whose weights differ in scale by orders of magnitude.
* ``t`` is detached (it moves only through the sort; its derivative would touch two weights).
* Per-layer targets: one global ``|w|`` sort at the end of the dense warm-up (unstructured);
  uniform per layer for ``channel`` (channel norms of different layers are not comparable);
  ``(M − N)/M`` for N:M. Each layer's ``r`` then ramps up linearly, the global target growing by
  ``epsilon`` per epoch until it reaches ``target``.
* The hard mask keeps exactly the top ``n − floor(r·n)`` scores (ties by position), which is
  ``m ≥ 0.5`` whenever scores are distinct, and gives exact counts when they are not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from slimline.compress.methods import (
    DataUse,
    MethodConfig,
    MethodError,
    MethodInputs,
    PruneResult,
    compose_masks,
    register_pruner,
)
from slimline.compress.prune.magnitude import magnitude_masks, masked_sparsity, prunable_weights
from slimline.compress.prune.nm import _from_groups, _to_groups, check_pattern, nm_mask
from slimline.distillation import distillation_loss_fn
from slimline.masks import apply_masks
from slimline.params import ParamError, check_range, check_regex, param
from slimline.training import TrainingDiverged, TrainParams, fit

if TYPE_CHECKING:
    from slimline.data import Dataset
    from slimline.progress import Progress

__all__ = ["PDPConfig", "PDPMask", "PDPPruner", "nm_thresholds", "pdp_soft_mask",
           "pdp_threshold", "train_pdp"]

Mode = Literal["unstructured", "channel", "nm"]
_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # RNN weights are not parametrizable


def pdp_threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Eq. 2: midpoint between the largest pruned and the smallest kept score when a
    ``sparsity`` fraction (``floor(sparsity · n)`` scores) is pruned. Returns 0 for none."""
    flat = scores.detach().flatten()
    pruned = int(sparsity * flat.numel())
    if pruned == 0:
        return flat.new_zeros(())
    ordered = torch.sort(flat).values
    if pruned >= flat.numel():
        return ordered[-1] * 2
    return (ordered[pruned - 1] + ordered[pruned]) / 2


def nm_thresholds(magnitude: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per M-group thresholds (eq. 2 inside each group): midpoint of the N-th and (N+1)-th
    largest ``|w|``, shaped ``(..., groups, 1)`` like :func:`slimline.compress.prune.nm._to_groups`."""
    check_pattern(n, m)
    groups = torch.sort(_to_groups(magnitude.detach(), m), dim=-1, descending=True).values
    return (groups[..., n - 1 : n] + groups[..., n : n + 1]) / 2


def pdp_soft_mask(
    scores: torch.Tensor, threshold: torch.Tensor, tau: float | torch.Tensor
) -> torch.Tensor:
    """Eq. 3: ``softmax([t²/τ, s²/τ])[1] = sigmoid((s² − t²)/τ)`` (differentiable in ``s``)."""
    return torch.sigmoid((scores.square() - threshold.square()) / tau)


def channel_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output channel (row of a Linear, filter of a conv)."""
    return weight.flatten(1).norm(dim=1)


class PDPMask(nn.Module):
    """Parametrization ``w -> m(w) · w`` with the layer's current target ``sparsity``."""

    def __init__(self, mode: Mode, sparsity: float, tau: float, n: int = 2, m: int = 4):
        super().__init__()
        self.mode, self.sparsity, self.tau, self.n, self.m = mode, sparsity, tau, n, m

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "channel":
            scores = channel_scores(weight)
            tau = self.tau * scores.detach().square().mean().clamp_min(1e-12)
            soft = pdp_soft_mask(scores, pdp_threshold(scores, self.sparsity), tau)
            return soft.reshape(-1, *([1] * (weight.dim() - 1)))
        tau = self.tau * weight.detach().square().mean().clamp_min(1e-12)
        if self.mode == "nm":
            groups = _to_groups(weight, self.m)
            threshold = nm_thresholds(weight.abs(), self.n, self.m)
            return _from_groups(pdp_soft_mask(groups, threshold, tau), weight.shape)
        if self.sparsity <= 0:
            return torch.ones_like(weight)
        return pdp_soft_mask(weight, pdp_threshold(weight.abs(), self.sparsity), tau)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask(weight) * weight


def hard_mask(
    weight: torch.Tensor, mode: Mode, sparsity: float, n: int = 2, m: int = 4
) -> torch.Tensor:
    """Final keep-mask (``m ≥ 0.5`` with exact counts, see the module docstring)."""
    weight = weight.detach()
    if mode == "nm":
        return nm_mask(weight, n, m)
    scores = channel_scores(weight) if mode == "channel" else weight.abs().flatten()
    keep = torch.ones_like(scores, dtype=torch.bool)
    pruned = int(sparsity * scores.numel())
    if pruned:
        keep[torch.argsort(scores, stable=True)[:pruned]] = False
    if mode == "channel":
        return keep.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()
    return keep.view_as(weight)


def ramp(final: float, target: float, epochs_pruning: int, epsilon: float) -> float:
    """Layer target after ``epochs_pruning`` pruning epochs: the global target grows by
    ``epsilon`` per epoch (capped at ``target``), each layer in proportion to its final target."""
    if target <= 0:
        return 0.0
    return final * min(1.0, epsilon * epochs_pruning / target)


@dataclass
class PDPPruner:
    """Drives PDP over a training run: call :meth:`start_epoch` before every epoch and
    :meth:`finish` after the last; it needs nothing else from the training loop."""

    model: nn.Module
    target: float
    mode: Mode = "unstructured"
    tau: float = 0.05
    epsilon: float = 0.1
    warmup_epochs: int = 1
    n: int = 2
    m: int = 4
    include: str | None = None
    exclude: str | None = None
    hard_from_epoch: int | None = None
    layer_targets: dict[str, float] = field(default_factory=dict)
    # Filled by finish(); the same dict object throughout, so a training loop handed it keeps
    # the hard-pruned weights at zero in the final hard-mask epochs.
    hard_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    _masks: dict[str, PDPMask] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode == "nm":
            check_pattern(self.n, self.m)
            self.target = (self.m - self.n) / self.m
        self.weights = {
            name: w
            for name, w in prunable_weights(self.model, self.include, self.exclude).items()
            if isinstance(self._owner(name)[0], _TYPES)
            and (self.mode != "nm" or w.shape[1] % self.m == 0)
        }
        if not self.weights:
            raise ValueError(
                "no Linear/Conv weight to prune (check include/exclude and N:M divisibility)"
            )

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        module_name, _, attr = name.rpartition(".")
        return self.model.get_submodule(module_name), attr

    def _final_targets(self) -> dict[str, float]:
        if self.mode == "unstructured":
            names = "|".join(f"^{n.replace('.', '[.]')}$" for n in self.weights)
            masks = magnitude_masks(self.model, self.target, "global", include=names)
            return {k: 1.0 - float(v.float().mean()) for k, v in masks.items()}
        return dict.fromkeys(self.weights, self.target)

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Install the soft masks when the warm-up ends, then update every layer's target;
        from ``hard_from_epoch`` on, train with the hard masks (:meth:`finish`)."""
        if self.hard_masks or (self.hard_from_epoch is not None and epoch >= self.hard_from_epoch):
            self.finish()
            return {"pdp_target": self.target, "pdp_hard": 1.0}
        if epoch < self.warmup_epochs:
            return {"pdp_target": 0.0}
        if not self._masks:
            self.layer_targets = self._final_targets()
            for name in self.weights:
                module, attr = self._owner(name)
                mask = PDPMask(self.mode, 0.0, self.tau, self.n, self.m)
                parametrize.register_parametrization(module, attr, mask)
                self._masks[name] = mask
        done = epoch - self.warmup_epochs + 1
        for name, mask in self._masks.items():
            mask.sparsity = (
                self.layer_targets[name]
                if self.mode == "nm"
                else ramp(self.layer_targets[name], self.target, done, self.epsilon)
            )
        return {"pdp_target": ramp(self.target, self.target, done, self.epsilon)}

    @torch.no_grad()
    def finish(self) -> dict[str, torch.Tensor]:
        """Remove the soft masks (weights back to plain parameters), apply the hard masks at
        the final per-layer targets and return them (True = kept). Idempotent."""
        if self.hard_masks:
            apply_masks(self.model, self.hard_masks)
            return self.hard_masks
        if not self.layer_targets:
            self.layer_targets = self._final_targets()
        for name in list(self._masks):
            module, attr = self._owner(name)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self._masks.clear()
        parameters = dict(self.model.named_parameters())
        self.hard_masks.update(
            {
                name: hard_mask(
                    parameters[name], self.mode, self.layer_targets[name], self.n, self.m
                )
                for name in self.weights
            }
        )
        apply_masks(self.model, self.hard_masks)
        return self.hard_masks


# ---- the method behind slimline.prune / the prune.pdp stage --------------------------------


@dataclass
class PDPConfig(MethodConfig):
    """PDP: parameter-free differentiable pruning masks while training (needs data)."""

    data: ClassVar[DataUse] = "required"

    method: Literal["unstructured", "channel", "nm"] = param(
        "unstructured", help="unstructured |w|, whole output channels (L2 norm) or N:M groups"
    )
    sparsity: float = param(
        0.9,
        help="final sparsity (unstructured: global; channel: per "
        "layer; ignored for nm, which is (m-n)/m)",
    )
    n: int = param(2, help="nm: weights kept in every group of m")
    m: int = param(4, help="nm: group size along the input dimension")
    tau: float = param(0.05, help="mask temperature relative to the layer's mean squared score "
                       "(0.05: best validation accuracy of 0.05/0.1/0.2/0.4 in bench/bench_pdp.py)")
    epsilon: float = param(0.15, help="global target sparsity added per epoch after warm-up")
    warmup_epochs: int = param(2, help="dense epochs before the masks are installed")
    epochs: int = param(12, help="total epochs (warm-up included)")
    hard_epochs: int = param(
        1, help="final epochs trained with the hard masks (0: harden only at the very end)"
    )
    lr: float = param(2e-3, help="peak learning rate (AdamW, cosine)")
    batch_size: int = param(64, help="samples per step (global, over all processes)")
    include: str | None = param(None, help="regex: prune only weights whose name matches")
    exclude: str | None = param(None, help="regex: keep weights whose name matches dense")
    distill: bool = param(False, help="distill from the input (unpruned) model (Hinton KD)")
    distill_loss: Literal["kd", "dist", "sinkhorn"] = param(
        "kd", help="distillation term: Hinton KD, DIST relations or Sinkhorn OT (slimline.search.distill)"
    )
    temperature: float = param(4.0, help="distillation temperature T")
    alpha: float = param(0.5, help="weight of the distillation term (1 - alpha: labels)")

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.m < 2 or not 1 <= self.n < self.m:
            raise ParamError("n", f"need 1 <= n < m and m >= 2, got {self.n}:{self.m}")
        if self.tau <= 0 or self.temperature <= 0 or self.epsilon <= 0:
            raise ParamError("tau", "tau, temperature and epsilon must be positive")
        if not 0 <= self.hard_epochs < self.epochs - self.warmup_epochs:
            raise ParamError("hard_epochs", "must leave at least one soft-mask epoch")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ParamError("warmup_epochs", f"must be in [0, epochs={self.epochs})")
        check_regex("include", self.include)
        check_regex("exclude", self.exclude)


def train_pdp(
    model: nn.Module,
    data: Dataset,
    p: PDPConfig,
    *,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Prune ``model`` in place with PDP while training; returns (keep-masks, epoch history)."""
    pruner = PDPPruner(
        model,
        p.sparsity,
        p.method,
        tau=p.tau,
        epsilon=p.epsilon,
        warmup_epochs=p.warmup_epochs,
        n=p.n,
        m=p.m,
        include=p.include,
        exclude=p.exclude,
        hard_from_epoch=p.epochs - p.hard_epochs if p.hard_epochs else None,
    )
    train = TrainParams(
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, warmup_epochs=min(1.0, float(p.epochs))
    )
    loss_fn = (
        distillation_loss_fn(
            teacher, temperature=p.temperature, alpha=p.alpha, loss=p.distill_loss
        )
        if teacher is not None
        else None
    )
    history = fit(
        model,
        data,
        train,
        seed=seed,
        progress=progress,
        loss_fn=loss_fn,
        masks=pruner.hard_masks,  # empty (no-op) until the hard-mask epochs
        on_epoch=pruner.start_epoch,
    )
    return pruner.finish(), history


@register_pruner(PDPConfig)
def prune_pdp(model: nn.Module, config: PDPConfig, inputs: MethodInputs) -> PruneResult:
    """Train ``model`` with PDP masks in place (distilled from its incoming self when
    ``config.distill``); earlier pruning stays and PDP ranks what is left."""
    data = inputs.require_data("prune.pdp")
    apply_masks(model, inputs.masks)
    teacher = inputs.teacher if inputs.teacher is not None else (
        copy.deepcopy(model) if config.distill else None)
    with inputs.progress(config.epochs, "epochs") as bar:
        try:
            new, history = train_pdp(model, data, config, teacher=teacher, seed=inputs.seed,
                                     progress=bar)
        except (TrainingDiverged, ValueError) as exc:
            raise MethodError(str(exc)) from None
    masks = compose_masks(inputs.masks, new)
    apply_masks(model, masks)
    sparsity, per_layer = masked_sparsity(model, list(new))
    target = (config.m - config.n) / config.m if config.method == "nm" else config.sparsity
    record = {"method": f"pdp-{config.method}", "target": target, "layer_sparsity": per_layer}
    return PruneResult(model, masks, record, {
        "sparsity": sparsity,
        "target_sparsity": target,
        "val_accuracy": history[-1]["val_accuracy"],
        "layer_sparsity": per_layer,
        "epochs": history,
    })
