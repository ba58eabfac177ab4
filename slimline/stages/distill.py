"""``distill``: train the input model (the student) toward a teacher stage's model.

The teacher is any finished stage named by ``teacher`` (e.g. the trained model before it was
pruned or shrunk); its weights stay frozen. Losses are :mod:`slimline.search.distill`'s, by name. FitNets
regressors train with the student and are dropped afterwards: the artifact holds the plain
student. Runs unchanged under ``torchrun`` (:func:`slimline.training.fit` shards the batches;
batch-level terms such as DIST's intra-class relation and the Sinkhorn plan are then computed
per shard).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from slimline.artifact import Artifact
from slimline.evaluation import accuracy, predict
from slimline.params import ParamError, param
from slimline.search.distill import DistillConfig, LossName, make_distill_loss
from slimline.stage import StageContext, register_stage
from slimline.training import TrainingDiverged, TrainParams, fit


@dataclass
class DistillParams(TrainParams):
    teacher: str = param(help="id of the stage whose model teaches (frozen)", kw_only=True)
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

    def distill_config(self) -> DistillConfig:
        names = {f.name for f in fields(DistillConfig)}
        return DistillConfig(**{name: getattr(self, name) for name in names})

    def train_params(self) -> TrainParams:
        return TrainParams(**{f.name: getattr(self, f.name) for f in fields(TrainParams)})


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """``KL(softmax(z_t) || softmax(z_s))`` per sample: how far the student's predictions are
    from the teacher's."""
    return float(F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                          reduction="batchmean", log_target=True))


@register_stage("distill", DistillParams, stage_refs=("teacher",))
def distill(ctx: StageContext, inputs: list[Artifact], p: DistillParams) -> Artifact:
    """Distill the input model from the `teacher` stage's model (KD/DIST/Sinkhorn/hint/DisWOT)."""
    out = inputs[0].derive(copy_model=True)
    teacher = copy.deepcopy(ctx.references["teacher"].model)
    x_val, y_val = ctx.data.x_val, ctx.data.y_val
    teacher_logits = predict(teacher, x_val)
    student_logits = predict(out.model, x_val)
    if teacher_logits.shape != student_logits.shape:
        raise ctx.fail(f"teacher {p.teacher!r} outputs {tuple(teacher_logits.shape[1:])} per "
                       f"sample but the student {tuple(student_logits.shape[1:])}: they must "
                       "predict the same classes")
    kl_before = teacher_kl(student_logits, teacher_logits)
    try:
        loss = make_distill_loss(p.distill_config(), teacher, out.model, ctx.data.x_train[:8])
    except ValueError as exc:
        raise ctx.fail(str(exc)) from None

    def on_epoch(epoch: int) -> None:
        loss.epoch = epoch  # so each batch's terms land in this epoch's record

    masks = out.masks if p.keep_masks else {}
    with ctx.progress(p.epochs, "epochs") as bar:
        try:
            history = fit(loss.trainee, ctx.data, p.train_params(),
                          masks=loss.trainee_masks(masks), seed=ctx.seed, progress=bar,
                          loss_fn=loss, on_epoch=on_epoch)
        except TrainingDiverged as exc:
            raise ctx.fail(str(exc)) from None
    for record in history:
        record.update(loss.epoch_means(int(record["epoch"]) - 1))
    if not p.keep_masks:
        out.masks = {}
    student_logits = predict(out.model, x_val)
    out.metrics = {
        "loss": p.loss,
        "teacher": ctx.references["teacher"].model_id,
        "val_accuracy": accuracy(student_logits, y_val),
        "teacher_val_accuracy": accuracy(teacher_logits, y_val),
        "val_kl_to_teacher_before": kl_before,
        "val_kl_to_teacher": teacher_kl(student_logits, teacher_logits),
        "train_loss": history[-1]["loss"],
        "epochs": history,
    }
    return out
