"""Distillation losses: how a student learns from a teacher, as pure functions plus one factory.

Logit losses take ``(student_logits, teacher_logits)`` (teacher already detached) and return a
scalar; feature losses take tapped features. :func:`make_distill_loss` turns a loss *name* and
weights into a ``loss_fn(model, x, y)`` for :func:`slimline.training.fit`:

    total = ce_weight * CE(z_s, y) + distill_weight * term(name) + kd_weight * KD   (kd_weight
    only for names other than "kd", e.g. hint + KD as in FitNets' second stage)

Feature terms (``hint``, ``diswot``) read activations through forward hooks that live for one
forward pass (:mod:`slimline.search.features`), so no hook outlives a batch.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimline.search.diswot import class_activation_matrix, relation_distance, semantic_distance
from slimline.search.features import find_global_pool, tap

__all__ = [
    "LOGIT_LOSSES", "LOSS_NAMES", "DistillConfig", "DistillationLoss", "dist_loss",
    "distillation_loss_fn", "hint_loss", "hinton_kd_loss", "kd_soft_loss", "make_distill_loss",
    "pearson_correlation", "sinkhorn_kd_loss", "sinkhorn_plan",
]

LossName = Literal["kd", "dist", "sinkhorn", "hint", "diswot"]
LOSS_NAMES: tuple[str, ...] = ("kd", "dist", "sinkhorn", "hint", "diswot")
# Losses that only need the two models' outputs: usable inside any training stage (PDP, QAT).
LOGIT_LOSSES: tuple[str, ...] = ("kd", "dist", "sinkhorn")


# ---- logit losses ----------------------------------------------------------------------------
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
def hint_loss(regressed_student: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al., ICLR 2015), eq. 3: ``1/2 ||u_h(x) - r(v_g(x))||^2`` between the
    teacher's hint ``u_h`` and the regressed student guided layer ``r(v_g)``. Averaged over
    elements (not summed) so the weight does not depend on the feature size; the 1/2 is kept."""
    if regressed_student.shape != teacher_feature.shape:
        raise ValueError(
            f"regressed student feature {tuple(regressed_student.shape)} does not match the "
            f"teacher's {tuple(teacher_feature.shape)}"
        )
    return 0.5 * F.mse_loss(regressed_student, teacher_feature.detach())


# ---- the loss_fn factory ---------------------------------------------------------------------
@dataclass(frozen=True)
class DistillConfig:
    """Which loss and how much of each term (see the module docstring for the total)."""

    loss: LossName = "kd"
    ce_weight: float = 1.0
    distill_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    beta: float = 1.0
    gamma: float = 1.0
    sinkhorn_epsilon: float = 0.1
    sinkhorn_iterations: int = 20
    relation_weight: float = 1.0
    semantic_weight: float = 1.0
    student_layer: str | None = None
    teacher_layer: str | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSS_NAMES:
            close = difflib.get_close_matches(str(self.loss), LOSS_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown distillation loss {self.loss!r}{hint}; "
                             f"known: {', '.join(LOSS_NAMES)}")
        weights = ("ce_weight", "distill_weight", "kd_weight", "beta", "gamma",
                   "relation_weight", "semantic_weight")
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0 or self.sinkhorn_epsilon <= 0 or self.sinkhorn_iterations < 1:
            raise ValueError("temperature and sinkhorn_epsilon must be > 0, "
                             "sinkhorn_iterations >= 1")


def forward_features(model: nn.Module, x: torch.Tensor, layer: str | None, *, role: str,
                     prefer_pre_pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass returning ``(logits, penultimate, feature)`` with their graphs.

    ``penultimate`` is the classifier's input (:func:`slimline.search.features.tap`); ``feature`` is
    the output of module ``layer`` when named, else the pre-GAP map when ``prefer_pre_pool``
    and the model pools globally, else ``penultimate``. Hooks live for this call only."""
    kept: dict[str, torch.Tensor] = {}
    handles = []
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            close = difflib.get_close_matches(layer, [n for n in modules if n], n=3)
            raise ValueError(f"{role} has no layer {layer!r}" +
                             (f" (close: {', '.join(close)})" if close else ""))
        handles.append(modules[layer].register_forward_hook(
            lambda _module, _args, output: kept.__setitem__("feature", output)))
    pre_pool = prefer_pre_pool and layer is None and find_global_pool(model) is not None
    try:
        found = tap(model, x, penultimate=True, pre_pool=pre_pool)
    finally:
        for handle in handles:
            handle.remove()
    assert found.logits is not None and found.penultimate is not None
    if layer is not None:
        feature = kept["feature"]
    else:
        feature = found.pre_pool if found.pre_pool is not None else found.penultimate
    return found.logits, found.penultimate, feature


def make_regressor(student_shape: torch.Size, teacher_shape: torch.Size,
                   student_layer: str, teacher_layer: str) -> nn.Module:
    """FitNets' regressor ``r``: a linear map for ``(B, C)`` features, a 1x1 convolution for
    ``(B, C, L)`` / ``(B, C, H, W)`` maps of equal spatial size (the paper's convolutional
    regressor with the kernel chosen so sizes match; 1x1 keeps it cheap)."""
    same_space = student_shape[2:] == teacher_shape[2:]
    if len(student_shape) != len(teacher_shape) or not same_space or len(student_shape) > 4:
        raise ValueError(
            f"cannot match student layer {student_layer!r} {tuple(student_shape[1:])} to teacher "
            f"layer {teacher_layer!r} {tuple(teacher_shape[1:])} (per sample): a hint needs the "
            "same rank and spatial size; pick other layers with student_layer / teacher_layer")
    channels_in, channels_out = student_shape[1], teacher_shape[1]
    if len(student_shape) == 2:
        return nn.Linear(channels_in, channels_out)
    conv = nn.Conv1d if len(student_shape) == 3 else nn.Conv2d
    return conv(channels_in, channels_out, kernel_size=1)


class StudentWithAdapters(nn.Module):
    """The student plus learned adapters (FitNets regressors) so that ``fit`` trains both;
    ``forward`` is the student's, and the adapters are dropped once training ends."""

    def __init__(self, student: nn.Module, adapters: nn.ModuleDict):
        super().__init__()
        self.student, self.adapters = student, adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


class DistillationLoss:
    """``loss_fn(model, x, y)`` for :func:`slimline.training.fit` built from a
    :class:`DistillConfig`. Train :attr:`trainee` (the student, wrapped with its adapters when
    the loss has any); per-epoch means of every term accumulate in :attr:`term_history` (set
    :attr:`epoch` from ``fit``'s ``on_epoch``). Features are tapped with hooks that live for
    one forward pass, so nothing stays attached to either model."""

    def __init__(self, config: DistillConfig, teacher: nn.Module, student: nn.Module | None = None,
                 sample_input: torch.Tensor | None = None):
        if config.loss in ("hint", "diswot") and student is None:
            raise ValueError(f"the {config.loss!r} loss taps the student's features: pass it")
        if config.loss == "hint" and sample_input is None:
            raise ValueError("the 'hint' loss needs a sample input to size its regressor")
        self.config, self.teacher, self.student = config, teacher, student
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.epoch = 0
        self.term_history: dict[int, dict[str, list[float]]] = {}
        if config.loss == "hint":
            assert student is not None and sample_input is not None
            was_training = student.training
            student.eval()
            with torch.no_grad():
                student_feature = self._features(student, sample_input, "student")[2]
                teacher_feature = self._features(teacher, sample_input, "teacher")[2]
            student.train(was_training)
            self.adapters["regressor"] = make_regressor(
                student_feature.shape, teacher_feature.shape,
                config.student_layer or "classifier input",
                config.teacher_layer or "classifier input")
        self._wrapped = StudentWithAdapters(student, self.adapters) if len(self.adapters) else None

    @property
    def trainee(self) -> nn.Module:
        """What to pass to ``fit``: the student, wrapped with its adapters when it has any."""
        if self.student is None:
            raise ValueError("no student was given: pass the model you train to fit directly")
        return self._wrapped if self._wrapped is not None else self.student

    def _features(self, model: nn.Module, x: torch.Tensor, role: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.config.student_layer if role == "student" else self.config.teacher_layer
        return forward_features(model, x, layer, role=role,
                                prefer_pre_pool=self.config.loss == "diswot")

    def trainee_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's pruning masks renamed for :attr:`trainee`."""
        if self._wrapped is None:
            return masks
        return {f"student.{name}": mask for name, mask in masks.items()}

    def terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every unweighted term of the configured loss on one batch (``model``: the trainee
        or the student; feature losses run the student itself, which is the trainee's
        forward)."""
        c = self.config
        with torch.no_grad():
            if c.loss in ("hint", "diswot"):
                teacher_logits, teacher_pooled, teacher_feature = self._features(
                    self.teacher, x, "teacher")
            else:
                teacher_logits = self.teacher(x)
        if c.loss in ("hint", "diswot"):
            assert self.student is not None
            student_logits, student_pooled, student_feature = self._features(
                self.student, x, "student")
        else:
            student_logits = model(x)
        out = {"ce": F.cross_entropy(student_logits, y)}
        if c.loss == "kd" or c.kd_weight > 0:
            out["kd"] = kd_soft_loss(student_logits, teacher_logits, temperature=c.temperature)
        if c.loss == "dist":
            out["dist"] = dist_loss(student_logits, teacher_logits, temperature=c.temperature,
                                    beta=c.beta, gamma=c.gamma)
        elif c.loss == "sinkhorn":
            out["sinkhorn"] = sinkhorn_kd_loss(
                student_logits, teacher_logits, temperature=c.temperature,
                epsilon=c.sinkhorn_epsilon, iterations=c.sinkhorn_iterations)
        elif c.loss == "hint":
            regressed = self.adapters["regressor"](student_feature)
            out["hint"] = hint_loss(regressed, teacher_feature)
        elif c.loss == "diswot":
            out["relation"] = relation_distance(student_feature, teacher_feature)
            out["semantic"] = semantic_distance(
                class_activation_matrix(student_logits, student_pooled.flatten(1), y),
                class_activation_matrix(teacher_logits, teacher_pooled.flatten(1), y))
        return out

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted total (module docstring)."""
        c = self.config
        total = c.ce_weight * terms["ce"]
        if c.loss == "diswot":
            total = total + c.distill_weight * (c.relation_weight * terms["relation"]
                                                + c.semantic_weight * terms["semantic"])
        else:
            total = total + c.distill_weight * terms[c.loss]
        if c.loss != "kd" and c.kd_weight > 0:
            total = total + c.kd_weight * terms["kd"]
        return total

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        terms = self.terms(model, x, y)
        record = self.term_history.setdefault(self.epoch, {})
        for name, value in terms.items():
            record.setdefault(name, []).append(float(value.detach()))
        return self.combine(terms)

    def epoch_means(self, epoch: int) -> dict[str, float]:
        """Mean of each term over the batches of ``epoch`` (this process's shard)."""
        record = self.term_history.get(epoch, {})
        return {f"{name}_term": sum(v) / len(v) for name, v in record.items() if v}


def make_distill_loss(config: DistillConfig, teacher: nn.Module, student: nn.Module,
                      sample_input: torch.Tensor | None = None) -> DistillationLoss:
    """The loss by name: ``make_distill_loss(DistillConfig("dist"), teacher, student, x[:8])``.
    ``sample_input`` sizes the FitNets regressor (one no-grad forward in eval mode)."""
    return DistillationLoss(config, teacher, student, sample_input)


def distillation_loss_fn(
    teacher: nn.Module, *, temperature: float, alpha: float, loss: str = "kd"
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``alpha * term + (1 - alpha) * CE`` for a logit loss (:data:`LOGIT_LOSSES`), frozen
    ``teacher``: what training stages such as ``prune.pdp`` and ``quant.qat`` plug into ``fit``.
    """
    if loss not in LOGIT_LOSSES:
        raise ValueError(f"training stages distill with a logit loss ({', '.join(LOGIT_LOSSES)})"
                         f", got {loss!r}; feature losses need the 'distill' stage")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need alpha in [0, 1], got {alpha}")
    config = DistillConfig(loss, ce_weight=1.0 - alpha, distill_weight=alpha,  # type: ignore[arg-type]
                           temperature=temperature)
    return DistillationLoss(config, teacher)
