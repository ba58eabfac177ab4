"""``distill``: train the input model (the student) toward a teacher stage's model; a thin
adapter over :func:`slimline.search.distill.distill` (losses by name: kd, dist, sinkhorn, hint,
diswot). The teacher is any finished stage named by ``teacher``; its weights stay frozen."""

from __future__ import annotations

from dataclasses import dataclass

from slimline.artifact import Artifact
from slimline.params import param
from slimline.search.distill import DistillConfig, distill
from slimline.stage import StageContext, register_stage
from slimline.training import TrainingDiverged


@dataclass
class DistillStageConfig(DistillConfig):
    """:class:`~slimline.search.distill.DistillConfig` plus which stage's model teaches."""

    teacher: str = param(help="id of the stage whose model teaches (frozen)", kw_only=True)


@register_stage("distill", DistillStageConfig, stage_refs=("teacher",))
def distill_stage(ctx: StageContext, inputs: list[Artifact], p: DistillStageConfig) -> Artifact:
    """Distill the input model from the `teacher` stage's model (KD/DIST/Sinkhorn/hint/DisWOT)."""
    out = inputs[0].derive(copy_model=True)
    teacher = ctx.references["teacher"]
    with ctx.progress(p.epochs, "epochs") as bar:
        try:
            result = distill(out.model, teacher.model, ctx.data, p, masks=out.masks,
                             seed=ctx.seed, progress=bar)
        except TrainingDiverged as exc:
            raise ctx.fail(str(exc)) from None
        except ValueError as exc:
            raise ctx.fail(f"{exc} (teacher {p.teacher!r})") from None
    out.masks = result.masks
    out.metrics = {**result.metrics, "teacher": teacher.model_id}
    return out
