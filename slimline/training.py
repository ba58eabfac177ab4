"""Supervised training loop shared by the ``train`` stage and the Python API.

    from slimline.data import load_dataset
    from slimline.training import TrainParams, fit
    history = fit(model, load_dataset("digits"), TrainParams(epochs=5))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.prune import apply_masks
from slimline.data import Dataset
from slimline.evaluation import accuracy, predict
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


def fit(model: nn.Module, data: Dataset, params: TrainParams | None = None, *,
        masks: dict[str, torch.Tensor] | None = None, seed: int = 0,
        progress: Progress | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place on ``data``'s train split; returns one record per epoch.

    ``masks`` (parameter name -> keep-mask) are re-applied after every step, so pruned weights
    stay exactly zero while the rest fine-tune.
    """
    p = params or TrainParams()
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
    for epoch in range(p.epochs):
        model.train()
        total_loss = 0.0
        for x, y in data.batches("train", p.batch_size, shuffle=True, seed=seed + epoch):
            for group in optimizer.param_groups:
                group["lr"] = p.lr * learning_rate_factor(step, total_steps, warmup_steps,
                                                          p.schedule)
            loss = F.cross_entropy(model(x), y, label_smoothing=p.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if masks:
                apply_masks(model, masks)
            total_loss += loss.item() * len(x)
            step += 1
        if not math.isfinite(total_loss):
            raise TrainingDiverged(f"training diverged at epoch {epoch + 1} (loss is "
                                   f"{total_loss}); lower 'lr'")
        val_accuracy = accuracy(predict(model, data.x_val), data.y_val)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(data.x_train),
                        "val_accuracy": val_accuracy})
        if progress is not None:
            progress.update(1, loss=history[-1]["loss"], val_acc=val_accuracy)
    model.eval()
    return history
