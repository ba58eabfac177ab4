"""``prune.pdp``: train-time differentiable pruning (PDP), unstructured, channel or N:M.

:func:`train_pdp` is the whole method on a plain module (the stage only wires artifacts); it
runs unchanged under ``torchrun`` because :func:`slimline.training.fit` shards the batches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from slimline.artifact import Artifact
from slimline.compress.prune.magnitude import apply_masks, layer_sparsity
from slimline.compress.prune.pdp import PDPPruner
from slimline.data import Dataset
from slimline.params import ParamError, check_range, check_regex, param
from slimline.progress import Progress
from slimline.search.distill import distillation_loss_fn
from slimline.stage import StageContext, register_stage
from slimline.training import TrainingDiverged, TrainParams, fit


@dataclass
class PDPParams:
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
    p: PDPParams,
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


@register_stage("prune.pdp", PDPParams)
def prune_pdp(ctx: StageContext, inputs: list[Artifact], p: PDPParams) -> Artifact:
    """Parameter-free differentiable pruning while training (optionally distilled)."""
    out = inputs[0].derive(copy_model=True)
    if out.masks:
        apply_masks(out.model, out.masks)  # earlier pruning stays; PDP ranks what is left
    teacher = copy.deepcopy(inputs[0].model) if p.distill else None
    with ctx.progress(p.epochs, "epochs") as bar:
        try:
            masks, history = train_pdp(
                out.model, ctx.data, p, teacher=teacher, seed=ctx.seed, progress=bar
            )
        except (TrainingDiverged, ValueError) as exc:
            raise ctx.fail(str(exc)) from None
    for name, mask in masks.items():
        out.masks[name] = mask & out.masks[name] if name in out.masks else mask
    apply_masks(out.model, out.masks)
    per_layer = layer_sparsity(out.model, list(masks))
    total = sum(mask.numel() for mask in masks.values())
    zeros = sum(int((~mask).sum()) for mask in masks.values())
    target = (p.m - p.n) / p.m if p.method == "nm" else p.sparsity
    out.state["pruning"] = {
        "method": f"pdp-{p.method}",
        "target": target,
        "layer_sparsity": per_layer,
    }
    out.metrics = {
        "sparsity": zeros / total,
        "target_sparsity": target,
        "val_accuracy": history[-1]["val_accuracy"],
        "layer_sparsity": per_layer,
        "epochs": history,
    }
    return out
