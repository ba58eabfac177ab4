"""Distillation for the ``distill`` stage: the feature losses (FitNets hints, DisWOT terms) and
one factory over them and the logit losses of :mod:`slimline.distillation`.

Logit losses take ``(student_logits, teacher_logits)`` (teacher already detached) and return a
scalar; feature losses take tapped features. :func:`make_distill_loss` turns a loss *name* and
weights into a ``loss_fn(model, x, y)`` for :func:`slimline.training.fit`:

    total = ce_weight * CE(z_s, y) + distill_weight * term(name) + kd_weight * KD   (kd_weight
    only for names other than "kd", e.g. hint + KD as in FitNets' second stage)

Feature terms (``hint``, ``diswot``) read activations through forward hooks that live for one
forward pass (:mod:`slimline.search.features`), so no hook outlives a batch.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimline.distillation import LOGIT_LOSSES, dist_loss, kd_soft_loss, sinkhorn_kd_loss
from slimline.evaluation import accuracy, predict
from slimline.params import ParamError, param
from slimline.search.diswot import class_activation_matrix, relation_distance, semantic_distance
from slimline.search.features import find_global_pool, tap
from slimline.training import TrainParams, fit

if TYPE_CHECKING:
    from slimline.data import Dataset
    from slimline.progress import Progress

__all__ = ["LOSS_NAMES", "DistillConfig", "DistillLossConfig", "DistillResult", "DistillationLoss",
           "distill", "hint_loss", "make_distill_loss", "teacher_kl"]

LossName = Literal["kd", "dist", "sinkhorn", "hint", "diswot"]
LOSS_NAMES: tuple[str, ...] = (*LOGIT_LOSSES, "hint", "diswot")


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
class DistillLossConfig:
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
    :class:`DistillLossConfig`. Train :attr:`trainee` (the student, wrapped with its adapters when
    the loss has any); per-epoch means of every term accumulate in :attr:`term_history` (set
    :attr:`epoch` from ``fit``'s ``on_epoch``). Features are tapped with hooks that live for
    one forward pass, so nothing stays attached to either model."""

    def __init__(self, config: DistillLossConfig, teacher: nn.Module, student: nn.Module | None = None,
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


def make_distill_loss(config: DistillLossConfig, teacher: nn.Module, student: nn.Module,
                      sample_input: torch.Tensor | None = None) -> DistillationLoss:
    """The loss by name: ``make_distill_loss(DistillLossConfig("dist"), teacher, student, x[:8])``.
    ``sample_input`` sizes the FitNets regressor (one no-grad forward in eval mode)."""
    return DistillationLoss(config, teacher, student, sample_input)


# ---- the distill method (slimline.distill, the distill stage) ------------------------------


@dataclass
class DistillConfig(TrainParams):
    """Train a student toward a frozen teacher: cross-entropy plus a named distillation term
    (Hinton KD, DIST, Sinkhorn, FitNets hint, DisWOT), on :class:`TrainParams`' schedule."""

    loss: LossName = param(
        "kd", help="kd: Hinton; dist: DIST relations; sinkhorn: SinKD optimal transport; "
        "hint: FitNets feature regression; diswot: DisWOT relation + semantic terms")
    ce_weight: float = param(1.0, help="weight of cross-entropy on the labels")
    distill_weight: float = param(1.0, help="weight of the named distillation term")
    kd_weight: float = param(0.0, help="extra Hinton KD term for losses other than kd")
    temperature: float = param(4.0, help="softmax temperature (kd, dist, sinkhorn)")
    beta: float = param(1.0, help="dist: weight of the inter-class (per sample) relation")
    gamma: float = param(1.0, help="dist: weight of the intra-class (per class) relation")
    sinkhorn_epsilon: float = param(0.1, help="sinkhorn: entropic regularisation")
    sinkhorn_iterations: int = param(20, help="sinkhorn: Sinkhorn iterations")
    relation_weight: float = param(1.0, help="diswot: weight of the sample-relation term")
    semantic_weight: float = param(1.0, help="diswot: weight of the class-activation term")
    student_layer: str | None = param(
        None, help="hint/diswot: student module whose output is tapped (default: the "
        "classifier's input for hint, the pre-GAP feature map for diswot)")
    teacher_layer: str | None = param(
        None, help="hint/diswot: teacher module whose output is tapped (default: the "
        "classifier's input for hint, the pre-GAP feature map for diswot)")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.distill_config()
        except ValueError as exc:
            raise ParamError(None, str(exc)) from None

    def distill_config(self) -> DistillLossConfig:
        names = {f.name for f in fields(DistillLossConfig)}
        return DistillLossConfig(**{name: getattr(self, name) for name in names})

    def train_params(self) -> TrainParams:
        return TrainParams(**{f.name: getattr(self, f.name) for f in fields(TrainParams)})


@dataclass
class DistillResult:
    """The trained student (in place), its per-epoch history and the metrics of the stage."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    metrics: dict[str, Any]


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """``KL(softmax(z_t) || softmax(z_s))`` per sample: how far the student's predictions are
    from the teacher's."""
    return float(F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                          reduction="batchmean", log_target=True))


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    config: DistillConfig | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> DistillResult:
    """Train ``student`` in place toward ``teacher`` (frozen; a copy is used) on ``data``.
    FitNets regressors train with the student and are dropped afterwards. ``masks`` keep
    pruned weights at zero (with ``config.keep_masks``). Runs unchanged under ``torchrun``.

    Raises:
        ValueError: the two models predict different classes, or the loss cannot be built.
    """
    config = config or DistillConfig()
    teacher = copy.deepcopy(teacher)
    x_val, y_val = data.x_val, data.y_val
    teacher_logits = predict(teacher, x_val)
    student_logits = predict(student, x_val)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"the teacher outputs {tuple(teacher_logits.shape[1:])} per sample but "
                         f"the student {tuple(student_logits.shape[1:])}: they must predict the "
                         "same classes")
    kl_before = teacher_kl(student_logits, teacher_logits)
    loss = make_distill_loss(config.distill_config(), teacher, student, data.x_train[:8])

    def on_epoch(epoch: int) -> None:
        loss.epoch = epoch  # so each batch's terms land in this epoch's record

    kept = dict(masks or {}) if config.keep_masks else {}
    history = fit(loss.trainee, data, config.train_params(), masks=loss.trainee_masks(kept),
                  seed=seed, progress=progress, loss_fn=loss, on_epoch=on_epoch)
    for record in history:
        record.update(loss.epoch_means(int(record["epoch"]) - 1))
    student_logits = predict(student, x_val)
    metrics = {
        "loss": config.loss,
        "val_accuracy": accuracy(student_logits, y_val),
        "teacher_val_accuracy": accuracy(teacher_logits, y_val),
        "val_kl_to_teacher_before": kl_before,
        "val_kl_to_teacher": teacher_kl(student_logits, teacher_logits),
        "train_loss": history[-1]["loss"],
        "epochs": history,
    }
    return DistillResult(student, kept, history, metrics)
