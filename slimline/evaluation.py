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
                 optimize: bool = True) -> torch.Tensor:
    """Logits of an ONNX file run by onnxruntime on CPU (what a deployment would compute).
    ``optimize=False``: without graph optimizations, so an int8 file runs its QDQ graph as
    written instead of this CPU's fused integer kernels (for a file made for another CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = [session.run(None, {name: inputs[i : i + batch_size].numpy()})[0]
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
