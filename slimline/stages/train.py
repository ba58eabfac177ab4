"""``train``: supervised training / fine-tuning with a sensible default schedule."""

from __future__ import annotations

from slimline.artifact import Artifact
from slimline.stage import StageContext, register_stage
from slimline.training import TrainingDiverged, TrainParams, fit


@register_stage("train", TrainParams)
def train(ctx: StageContext, inputs: list[Artifact], p: TrainParams) -> Artifact:
    """Train or fine-tune the model on the recipe's dataset (masks kept)."""
    out = inputs[0].derive(copy_model=True)
    masks = out.masks if p.keep_masks else {}
    with ctx.progress(p.epochs, "epochs") as bar:
        try:
            history = fit(out.model, ctx.data, p, masks=masks, seed=ctx.seed, progress=bar)
        except TrainingDiverged as exc:
            raise ctx.fail(str(exc)) from None
    if not p.keep_masks:
        out.masks = {}
    out.metrics = {"val_accuracy": history[-1]["val_accuracy"],
                   "train_loss": history[-1]["loss"], "epochs": history}
    return out
