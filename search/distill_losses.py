"""Distillation losses: how a compressed student learns from its full-precision parent.

Every loss takes ``(student_logits, teacher_logits, labels)`` and returns a scalar, so stages
can offer them by name; the search work adds more losses here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["distillation_loss_fn", "hinton_kd_loss"]


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Hinton et al., 2015, "Distilling the Knowledge in a Neural Network", sec. 2:

        L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

    The ``T^2`` keeps the soft-target gradients on the same scale as the hard-label term when
    ``T`` changes (their eq. 2 scales the gradient by ``1/T^2``).
    """
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and alpha in [0, 1], got {temperature}, {alpha}")
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def distillation_loss_fn(
    teacher: nn.Module, *, temperature: float, alpha: float
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``loss_fn(model, x, y)`` for :func:`slimline.training.fit` that distills from
    ``teacher`` (frozen, eval mode, no gradients)."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return hinton_kd_loss(model(x), teacher_logits, y, temperature=temperature, alpha=alpha)

    return loss
