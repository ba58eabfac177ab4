"""Logit distillation losses every training method can use (layer 1: below the pruners and
quantizers that distill while they train, PDP and QAT, and the ``distill`` stage's factory).

Each takes ``(student_logits, teacher_logits)`` (the teacher's detached) and returns a scalar;
:func:`distillation_loss_fn` mixes one with cross-entropy into a ``loss_fn(model, x, y)`` for
:func:`slimline.training.fit`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LOGIT_LOSSES", "dist_loss", "distillation_loss_fn", "hinton_kd_loss", "kd_soft_loss",
    "pearson_correlation", "sinkhorn_kd_loss", "sinkhorn_plan",
]

# Losses that only need the two models' outputs: usable inside any training method.
LOGIT_LOSSES: tuple[str, ...] = ("kd", "dist", "sinkhorn")


def kd_soft_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton et al., 2015, sec. 2: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batch
    mean. The ``T^2`` keeps soft-target gradients on the hard-label scale as ``T`` changes (the
    soft-target gradient scales as ``1/T^2`` at high temperature, sec. 2.1). Zero iff the two
    softmaxes agree."""
    if temperature <= 0:
        raise ValueError(f"need temperature > 0, got {temperature}")
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return temperature**2 * kl


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Hinton et al., 2015: ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(z_s, y)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need alpha in [0, 1], got {alpha}")
    soft = kd_soft_loss(student_logits, teacher_logits, temperature=temperature)
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation ``rho(u, v) = cov(u, v) / (std(u) std(v))`` of two
    ``(n, d)`` matrices, DIST's match measure (Huang et al. 2022, sec. 3); ``eps`` guards
    constant rows."""
    a_centred = a - a.mean(dim=1, keepdim=True)
    b_centred = b - b.mean(dim=1, keepdim=True)
    return F.cosine_similarity(a_centred, b_centred, dim=1, eps=eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"),
    ``beta * L_inter + gamma * L_intra`` with ``Y = softmax(Z / tau)`` and distance
    ``d_p(u, v) = 1 - rho(u, v)``:

    * inter-class relation ``L_inter = tau^2 / B * sum_i d_p(Y_s[i, :], Y_t[i, :])`` (each
      sample's ranking over classes);
    * intra-class relation ``L_intra = tau^2 / C * sum_j d_p(Y_s[:, j], Y_t[:, j])`` (each
      class's ranking over the batch).

    The paper's total is ``alpha * L_cls + beta * L_inter + gamma * L_intra``; the caller adds
    the cross-entropy. Zero when the student's probabilities are a positive affine map of the
    teacher's row- and column-wise (in particular when they are equal).
    """
    if temperature <= 0:
        raise ValueError(f"need temperature > 0, got {temperature}")
    student = torch.softmax(student_logits / temperature, dim=1)
    teacher = torch.softmax(teacher_logits.detach() / temperature, dim=1)
    inter = (1.0 - pearson_correlation(student, teacher)).mean()
    intra = (1.0 - pearson_correlation(student.t(), teacher.t())).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def sinkhorn_plan(cost: torch.Tensor, *, epsilon: float, iterations: int) -> torch.Tensor:
    """Entropy-regularised transport plan between uniform marginals (Cuturi, NeurIPS 2013):
    ``P = diag(u) exp(-D / eps) diag(v)`` with ``P 1 = 1/n``, ``P^T 1 = 1/m``, found by
    ``iterations`` Sinkhorn updates. Runs in the log domain so a small ``eps`` does not
    underflow ``exp(-D / eps)``; gradients flow through the unrolled updates."""
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    rows, cols = cost.shape
    log_kernel = -cost / epsilon
    log_a = torch.full((rows,), -torch.log(torch.tensor(float(rows))).item(), dtype=cost.dtype)
    log_b = torch.full((cols,), -torch.log(torch.tensor(float(cols))).item(), dtype=cost.dtype)
    log_u = torch.zeros_like(log_a)
    log_v = torch.zeros_like(log_b)
    for _ in range(iterations):
        log_u = log_a - torch.logsumexp(log_kernel + log_v[None, :], dim=1)
        log_v = log_b - torch.logsumexp(log_kernel + log_u[:, None], dim=0)
    return torch.exp(log_u[:, None] + log_kernel + log_v[None, :])


def sinkhorn_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
) -> torch.Tensor:
    """Sinkhorn-distance KD: the batch-wise reformulation of SinKD (Cui et al., LREC-COLING
    2024, "Sinkhorn Distance Minimization for Knowledge Distillation"), as in the authors'
    code. Exactly what is computed:

    1. ``p_s = softmax(z_s / T)``, ``p_t = softmax(z_t / T)``, both ``(B, C)``;
    2. the batch is an empirical distribution of ``B`` points in the simplex for each model;
       the cost of moving student sample ``i`` onto teacher sample ``j`` is
       ``D_ij = ||p_s[i] - p_t[j]||_1`` (the L1 ground cost of the authors' code);
    3. ``P`` = :func:`sinkhorn_plan` of ``D`` with uniform marginals ``1/B``;
    4. loss ``= <P, D> = sum_ij P_ij D_ij``, differentiated through the iterations.

    The authors normalise rows and columns to sum 1 (mass ``B``), so their value is ``B``
    times ours, and they scale it by a small constant; the weight here is ``distill_weight``.
    Not zero for identical predictions (the entropy term spreads mass off the diagonal); it
    tends to 0 as ``epsilon -> 0`` when the samples' predictions are distinct.
    """
    if temperature <= 0:
        raise ValueError(f"need temperature > 0, got {temperature}")
    student = torch.softmax(student_logits / temperature, dim=1)
    teacher = torch.softmax(teacher_logits.detach() / temperature, dim=1)
    cost = (student[:, None, :] - teacher[None, :, :]).abs().sum(dim=2)
    plan = sinkhorn_plan(cost, epsilon=epsilon, iterations=iterations)
    return (plan * cost).sum()


# ---- feature losses --------------------------------------------------------------------------


def distillation_loss_fn(
    teacher: nn.Module, *, temperature: float, alpha: float, loss: str = "kd"
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``alpha * term + (1 - alpha) * CE`` for a logit loss (:data:`LOGIT_LOSSES`; DIST with
    beta = gamma = 1, Sinkhorn with epsilon 0.1 and 20 iterations) and a frozen ``teacher``:
    what training methods such as PDP and QAT plug into ``fit``."""
    if loss not in LOGIT_LOSSES:
        raise ValueError(f"training stages distill with a logit loss ({', '.join(LOGIT_LOSSES)})"
                         f", got {loss!r}; feature losses need the 'distill' stage")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need alpha in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"need temperature > 0, got {temperature}")
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    terms: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "kd": lambda s, t: kd_soft_loss(s, t, temperature=temperature),
        "dist": lambda s, t: dist_loss(s, t, temperature=temperature),
        "sinkhorn": lambda s, t: sinkhorn_kd_loss(s, t, temperature=temperature),
    }
    term = terms[loss]

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        student_logits = model(x)
        return (1.0 - alpha) * F.cross_entropy(student_logits, y) + alpha * term(
            student_logits, teacher_logits)

    return loss_fn
