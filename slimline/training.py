"""Supervised training loop shared by the ``train`` stage and the Python API.

    from slimline.data import load_dataset
    from slimline.training import TrainParams, fit
    history = fit(model, load_dataset("digits"), TrainParams(epochs=5))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slimline.data import Dataset
from slimline.evaluation import accuracy, predict
from slimline.masks import apply_masks
from slimline.params import ParamError, check_range, param
from slimline.progress import Progress


@dataclass
class TrainParams:
    epochs: int = param(15, help="passes over the training split")
    batch_size: int = param(64, help="samples per step")
    optimizer: Literal["adamw", "sgd"] = param("adamw", help="adamw or sgd (Nesterov momentum)")
    lr: float = param(3e-3, help="peak learning rate")
    weight_decay: float = param(5e-4, help="decoupled weight decay")
    momentum: float = param(0.9, help="SGD momentum")
    schedule: Literal["cosine", "constant"] = param("cosine", help="learning-rate schedule")
    warmup_epochs: float = param(1.0, help="linear warm-up length in epochs")
    label_smoothing: float = param(0.0, help="cross-entropy label smoothing")
    keep_masks: bool = param(True, help="keep pruned weights at zero while fine-tuning")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ParamError("epochs", f"must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ParamError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ParamError("lr", f"must be positive, got {self.lr}")
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_range("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))


class TrainingError(ValueError):
    """The model or dataset cannot be trained as asked (says why)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


LossFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(length: int, rank: int, size: int) -> slice:
    """Contiguous share of a global batch for one rank (sizes differ by at most one)."""
    return slice(rank * length // size, (rank + 1) * length // size)


def _all_reduce_gradients(model: nn.Module, weight: float) -> None:
    """Sum ``weight * grad`` over ranks. With ``weight`` = local share of the global batch the
    result is the gradient of the global-batch mean loss, exactly what one process computes
    (DistributedDataParallel averages instead, which is off when the last batch splits unevenly).
    """
    for parameter in model.parameters():
        if parameter.grad is None:  # keep the collective calls aligned across ranks
            parameter.grad = torch.zeros_like(parameter)
        parameter.grad.mul_(weight)
        dist.all_reduce(parameter.grad)


def fit(model: nn.Module, data: Dataset, params: TrainParams | None = None, *,
        masks: dict[str, torch.Tensor] | None = None, seed: int = 0,
        progress: Progress | None = None, loss_fn: LossFunction | None = None,
        on_step: Callable[[], None] | None = None,
        on_epoch: Callable[[int], dict[str, float] | None] | None = None
        ) -> list[dict[str, float]]:
    """Train ``model`` in place on ``data``'s train split; returns one record per epoch.

    ``masks`` (parameter name -> keep-mask) are re-applied after every step, so pruned weights
    stay exactly zero while the rest fine-tune. ``loss_fn(model, x, y)`` replaces the
    cross-entropy (e.g. knowledge distillation); ``on_step()`` runs after every optimizer step,
    ``on_epoch(epoch)`` before each epoch (0-based); the dict it returns, if any, is merged into
    that epoch's record.

    Under ``torch.distributed`` (e.g. ``torchrun``) every rank walks the same shuffled global
    batches, takes its contiguous shard, and gradients are summed weighted by shard size, so N
    processes follow the one-process trajectory up to floating-point reduction order (BatchNorm
    statistics are per shard, so BN models differ slightly).
    """
    p = params or TrainParams()
    rank, size = world()
    if p.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum,
                                    nesterov=True, weight_decay=p.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps_per_epoch = math.ceil(len(data.x_train) / p.batch_size)
    total_steps = p.epochs * steps_per_epoch
    warmup_steps = int(p.warmup_epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    step = 0
    if loss_fn is None and getattr(data, "task", "classification") != "classification":
        raise TrainingError(
            f"dataset {data.name!r} has no labels (task {data.task!r}): training with "
            "cross-entropy needs a labelled dataset (text lines 'label<TAB>text')")

    def classification_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = m(x)
        if logits.dim() != 2:
            raise TrainingError(
                f"training takes (batch, classes) logits; {type(m).__name__} returns shape "
                f"{tuple(logits.shape)} (a language model's per-token logits or an embedding "
                "model are not classifiers: use a sequence-classification head)")
        return F.cross_entropy(logits, y, label_smoothing=p.label_smoothing)

    compute_loss = loss_fn or classification_loss
    for epoch in range(p.epochs):
        extra = on_epoch(epoch) if on_epoch is not None else None
        model.train()
        total_loss = 0.0
        for x, y in data.batches("train", p.batch_size, shuffle=True, seed=seed + epoch):
            for group in optimizer.param_groups:
                group["lr"] = p.lr * learning_rate_factor(step, total_steps, warmup_steps,
                                                          p.schedule)
            batch = len(x)
            if size > 1:
                part = _shard(batch, rank, size)
                x, y = x[part], y[part]
            optimizer.zero_grad(set_to_none=True)
            if len(x):
                loss = compute_loss(model, x, y)
                loss.backward()
                local_loss = loss.detach() * len(x)
            else:
                local_loss = torch.zeros(())
            if size > 1:
                _all_reduce_gradients(model, len(x) / batch)
                dist.all_reduce(local_loss)
            optimizer.step()
            if masks:
                apply_masks(model, masks)
            if on_step is not None:
                on_step()
            total_loss += float(local_loss)
            step += 1
        if not math.isfinite(total_loss):
            raise TrainingDiverged(f"training diverged at epoch {epoch + 1} (loss is "
                                   f"{total_loss}); lower 'lr'")
        val_accuracy = accuracy(predict(model, data.x_val), data.y_val)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(data.x_train),
                        "val_accuracy": val_accuracy, **(extra or {})})
        if progress is not None:
            progress.update(1, loss=history[-1]["loss"], val_acc=val_accuracy)
    model.eval()
    return history
