"""``eval``: top-1 accuracy, plus output fidelity against the model this one was derived from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F

from slimline.artifact import Artifact
from slimline.evaluation import accuracy, fidelity, predict, predict_onnx
from slimline.params import ParamError, param
from slimline.stage import StageContext, register_stage


@dataclass
class EvalParams:
    split: Literal["test", "val", "train"] = param("test", help="dataset split to score")
    batch_size: int = param(256, help="samples per forward pass")
    reference: str | None = param(
        None, help="stage id whose model to compare outputs with (default: the parent model)")
    backend: Literal["torch", "onnx"] = param(
        "torch", help="torch: the PyTorch model; onnx: the exported file, run by onnxruntime")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ParamError("batch_size", f"must be at least 1, got {self.batch_size}")


@register_stage("eval", EvalParams, stage_refs=("reference",))
def evaluate(ctx: StageContext, inputs: list[Artifact], p: EvalParams) -> Artifact:
    """Top-1 accuracy and loss; logit MSE and top-1 agreement vs the parent (or `reference`)."""
    out = inputs[0].derive()
    x, y = ctx.data.split(p.split)
    if p.backend == "onnx":
        onnx_path = inputs[0].files.get("onnx")
        if onnx_path is None:
            raise ctx.fail("backend 'onnx' needs an exported model: put an export stage in "
                           "its 'needs'")
        from slimline.compress.deploy import exact_on_this_machine, not_exact_here_note

        exact_here = exact_on_this_machine(onnx_path)
        logits = predict_onnx(onnx_path, x, p.batch_size, optimize=exact_here)
    else:
        logits = predict(out.model, x, p.batch_size)
    metrics = {"split": p.split, "accuracy": accuracy(logits, y), "backend": p.backend,
               "loss": float(F.cross_entropy(logits, y)), "samples": len(y)}
    if p.backend == "onnx" and not exact_here:
        metrics["backend"] = "onnx-reference"
        metrics["note"] = not_exact_here_note(ctx.target.name)
    reference = ctx.references.get("reference") or _parent(ctx, out)
    if reference is not None:
        reference_logits = predict(reference.model, x, p.batch_size)
        metrics.update(fidelity(logits, reference_logits).as_dict())
        metrics["reference"] = reference.model_id
        metrics["reference_accuracy"] = accuracy(reference_logits, y)
        metrics["accuracy_delta"] = metrics["accuracy"] - metrics["reference_accuracy"]
    out.metrics = metrics
    return out


def _parent(ctx: StageContext, artifact: Artifact) -> Artifact | None:
    """The model this one was derived from; an untrained source model is no useful reference."""
    parent_id = artifact.parent_model_id
    if parent_id is None or ctx.lookup is None:
        return None
    parent = ctx.lookup(parent_id)
    if parent_id == "source" and "checkpoint_sha256" not in parent.state:
        return None
    return parent
