"""Accuracy and output-fidelity measurements shared by the train and eval stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for ``inputs`` in eval mode (the model's previous mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(inputs[i : i + batch_size])
                          for i in range(0, len(inputs), batch_size)])
    finally:
        model.train(was_training)


def predict_onnx(path: str | Path, inputs: torch.Tensor, batch_size: int = 256, *,
                 optimize: bool = True, model: nn.Module | None = None) -> torch.Tensor:
    """Logits of an ONNX file run by onnxruntime on CPU (what a deployment would compute).
    ``optimize=False``: without graph optimizations, so an int8 file runs its QDQ graph as
    written instead of this CPU's fused integer kernels (for a file made for another CPU; one
    with onnxruntime's int8 contrib MatMuls runs as its QDQ form).
    ``model`` (the exported one) says how a batch becomes the file's named inputs, e.g.
    ``input_ids`` + ``attention_mask`` (:func:`slimline.export.onnx_export.onnx_feeds`)."""
    import onnxruntime as ort

    from slimline.export.onnx_export import onnx_feeds
    from slimline.export.ort_contrib import session_source

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(session_source(path, optimize=optimize), options,
                                   providers=["CPUExecutionProvider"])
    declared = [arg.name for arg in session.get_inputs()]

    def feed(batch: torch.Tensor) -> dict[str, np.ndarray]:
        return (onnx_feeds(model, batch, declared) if model is not None
                else {declared[0]: batch.numpy()})

    batches = [session.run(None, feed(inputs[i : i + batch_size]))[0]
               for i in range(0, len(inputs), batch_size)]
    return torch.from_numpy(np.concatenate(batches))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


@dataclass
class Fidelity:
    """How closely a compressed model's outputs follow its reference's."""

    logit_mse: float
    agreement: float  # fraction of samples with the same top-1 class

    def as_dict(self) -> dict[str, float]:
        return {"logit_mse": self.logit_mse, "agreement": self.agreement}


def fidelity(logits: torch.Tensor, reference_logits: torch.Tensor) -> Fidelity:
    return Fidelity(
        logit_mse=float(F.mse_loss(logits, reference_logits)),
        agreement=float((logits.argmax(1) == reference_logits.argmax(1)).float().mean()),
    )


def embedding_fidelity(embeddings: torch.Tensor, reference: torch.Tensor,
                       k: int = 5) -> dict[str, float]:
    """How closely embeddings follow the reference model's on the same inputs: per-sample
    cosine (mean and worst) and k-nearest-neighbour overlap (the share of each sample's ``k``
    nearest neighbours by cosine, among the other samples, that both models agree on: what a
    retrieval system built on the embeddings would notice)."""
    a = F.normalize(embeddings.flatten(1).double(), dim=1)
    b = F.normalize(reference.flatten(1).double(), dim=1)
    cosine = (a * b).sum(1)
    k = max(1, min(k, len(a) - 1))
    overlap = 1.0
    if len(a) > 1:
        eye = torch.eye(len(a), dtype=torch.bool)
        mine = (a @ a.T).masked_fill(eye, -2).topk(k, dim=1).indices
        theirs = (b @ b.T).masked_fill(eye, -2).topk(k, dim=1).indices
        shared = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(mine, theirs)]
        overlap = sum(shared) / (k * len(a))
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            f"knn{k}_overlap": float(overlap)}
