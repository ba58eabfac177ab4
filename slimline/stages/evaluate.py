"""``eval``: top-1 accuracy, plus output fidelity against the model this one was derived from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F

from slimline.artifact import Artifact
from slimline.evaluation import accuracy, embedding_fidelity, fidelity, predict, predict_onnx
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
    neighbours: int = param(
        5, help="embedding outputs: k of the k-nearest-neighbour overlap with the reference")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ParamError("batch_size", f"must be at least 1, got {self.batch_size}")


@register_stage("eval", EvalParams, stage_refs=("reference",))
def evaluate(ctx: StageContext, inputs: list[Artifact], p: EvalParams) -> Artifact:
    """Top-1 accuracy and loss; logit MSE and top-1 agreement vs the parent (or `reference`);
    for embeddings, cosine and k-NN overlap vs the parent."""
    out = inputs[0].derive()
    x, y = ctx.data.split(p.split)
    if p.backend == "onnx":
        onnx_path = inputs[0].files.get("onnx")
        if onnx_path is None:
            raise ctx.fail("backend 'onnx' needs an exported model: put an export stage in "
                           "its 'needs'")
        from slimline.compress.deploy import exact_on_this_machine, not_exact_here_note

        exact_here = exact_on_this_machine(onnx_path)
        logits = predict_onnx(onnx_path, x, p.batch_size, optimize=exact_here, model=out.model)
    else:
        logits = predict(out.model, x, p.batch_size)
    # Scored against labels only when the outputs are class logits; embeddings (and language
    # model logits) are compared with the reference model's outputs instead.
    classes = (ctx.data.task == "classification" and logits.dim() == 2
               and logits.shape[1] == ctx.data.num_classes)
    metrics: dict[str, Any] = {"split": p.split, "backend": p.backend, "samples": len(y),
                               "outputs": "classes" if classes else (
                                   "embedding" if logits.dim() == 2 else "tokens")}
    if classes:
        metrics |= {"accuracy": accuracy(logits, y), "loss": float(F.cross_entropy(logits, y))}
    if p.backend == "onnx" and not exact_here:
        metrics["backend"] = "onnx-reference"
        metrics["note"] = not_exact_here_note(ctx.target.name)
    reference = ctx.references.get("reference") or _parent(ctx, out)
    if reference is not None:
        reference_logits = predict(reference.model, x, p.batch_size)
        metrics["reference"] = reference.model_id
        if classes:
            metrics.update(fidelity(logits, reference_logits).as_dict())
            metrics["reference_accuracy"] = accuracy(reference_logits, y)
            metrics["accuracy_delta"] = metrics["accuracy"] - metrics["reference_accuracy"]
        elif logits.dim() == 2:
            metrics.update(embedding_fidelity(logits, reference_logits, k=p.neighbours))
        else:  # per-token logits: does the next-token prediction survive compression?
            metrics["logit_mse"] = float(F.mse_loss(logits, reference_logits))
            metrics["agreement"] = float(
                (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
    out.metrics = metrics
    return out


def _parent(ctx: StageContext, artifact: Artifact) -> Artifact | None:
    """The model this one was derived from; an untrained source model is no useful reference."""
    parent_id = artifact.parent_model_id
    if parent_id is None or ctx.lookup is None:
        return None
    parent = ctx.lookup(parent_id)
    # ...except without labels, where the parent's outputs are the only yardstick there is.
    if (parent_id == "source" and "checkpoint_sha256" not in parent.state
            and ctx.data.task == "classification"):
        return None
    return parent
