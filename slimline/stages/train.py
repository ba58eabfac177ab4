"""``train``: supervised training / fine-tuning with a sensible default schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from compress.prune import apply_masks
from slimline.artifact import Artifact
from slimline.evaluation import accuracy, predict
from slimline.params import ParamError, check_range, param
from slimline.stage import StageContext, register_stage


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


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@register_stage("train", TrainParams)
def train(ctx: StageContext, inputs: list[Artifact], p: TrainParams) -> Artifact:
    """Train or fine-tune the model on the recipe's dataset (masks kept)."""
    out = inputs[0].derive(copy_model=True)
    model, data = out.model, ctx.data
    if p.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum,
                                    nesterov=True, weight_decay=p.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps_per_epoch = math.ceil(len(data.x_train) / p.batch_size)
    total_steps = p.epochs * steps_per_epoch
    warmup_steps = int(p.warmup_epochs * steps_per_epoch)
    masks = out.masks if p.keep_masks else {}
    epochs_log, step = [], 0
    with ctx.progress(p.epochs, "epochs") as bar:
        for epoch in range(p.epochs):
            model.train()
            total_loss = 0.0
            for x, y in data.batches("train", p.batch_size, shuffle=True, seed=ctx.seed + epoch):
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
                raise ctx.fail(f"training diverged at epoch {epoch + 1} (loss is {total_loss}); "
                               "lower 'lr'")
            val_accuracy = accuracy(predict(model, data.x_val), data.y_val)
            epochs_log.append({"epoch": epoch + 1, "loss": total_loss / len(data.x_train),
                               "val_accuracy": val_accuracy})
            bar.update(1, loss=epochs_log[-1]["loss"], val_acc=val_accuracy)
    model.eval()
    if masks and not p.keep_masks:
        out.masks = {}
    out.metrics = {"val_accuracy": epochs_log[-1]["val_accuracy"],
                   "train_loss": epochs_log[-1]["loss"], "epochs": epochs_log}
    return out
