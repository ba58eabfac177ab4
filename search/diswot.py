"""DisWOT math (Dong, Li & Wei, CVPR 2023, "DisWOT: Student Architecture Search for
Distillation WithOut Training"): teacher-student similarity of sample relations and of
class-activation semantics.

Pure, differentiable torch functions, shared by the training-free proxies
(:mod:`slimline.search.proxies`, scored at random student init) and the distillation losses
(:mod:`slimline.search.distill`, minimised during training). Distances are >= 0 and 0 for identical
inputs; a proxy negates them so that higher = more similar = better.

Notation: ``b`` samples, ``K`` classes, ``C`` channels. Student and teacher may differ in
channels and spatial size: every comparison happens between ``b x b`` or ``K x K`` matrices.

* **Sample relation** (paper sec. 3.2, "relation similarity"): the pre-pooling feature map
  ``A in R^{b x C x H x W}`` flattened to ``b x CHW`` gives the Gram ``A A^T``, each row scaled
  to unit L2 norm; the metric is ``||G_t - G_s||_F^2 / b^2``.
* **Semantic / class activation** (paper sec. 3.2, "semantic similarity"): Grad-CAM's
  channel weights for class ``k`` are ``d z_k / d A`` averaged over space, which for a
  global-average-pool + linear head is the head's weight row. The paper's code takes the
  cross-entropy gradient of the head weight, ``dL/dW in R^{K x C}``, as the class activation
  matrix and compares channel-by-channel Grams (which needs equal ``C``). We compare the
  class-by-class Gram ``M M^T in R^{K x K}`` instead, row-normalised the same way, so a
  student may be narrower than its teacher; for equal widths both forms are zero exactly when
  the row-normalised activation patterns agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "class_activation_matrix",
    "class_relation",
    "relation_distance",
    "sample_relation",
    "semantic_distance",
]


def sample_relation(features: torch.Tensor) -> torch.Tensor:
    """Row-normalised sample Gram ``G = normalize_rows(A A^T)`` (DisWOT's relation matrix).

    ``features``: ``(b, ...)``, flattened per sample. Returns ``(b, b)``; each row has unit L2
    norm (a zero row stays zero).
    """
    if features.dim() < 2:
        raise ValueError(f"need features of shape (batch, ...), got {tuple(features.shape)}")
    flat = features.reshape(features.shape[0], -1)
    return F.normalize(flat @ flat.t(), p=2, dim=1)


def relation_distance(
    student_features: torch.Tensor, teacher_features: torch.Tensor
) -> torch.Tensor:
    """``||G_t - G_s||_F^2 / b^2`` between sample relations (DisWOT relation metric, negated
    there as a score). Features may differ in every dimension but the batch."""
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(
            "student and teacher features need the same batch size, got "
            f"{student_features.shape[0]} and {teacher_features.shape[0]}"
        )
    batch = student_features.shape[0]
    diff = sample_relation(teacher_features) - sample_relation(student_features)
    return diff.pow(2).sum() / batch**2


def class_activation_matrix(
    logits: torch.Tensor, pooled_features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy gradient of a linear head's weight, in closed form: ``(softmax(z) -
    onehot(y))^T p / b`` of shape ``(K, C)``.

    For ``z = W p + c`` and mean cross-entropy ``L``, ``dL/dW = (softmax(z) - Y)^T p / b``:
    exactly what the DisWOT code reads from ``fc.weight.grad`` after one backward pass, but
    differentiable and free of side effects on ``.grad``. Row ``k`` weighs each channel by how
    much it moves class ``k``'s loss: the Grad-CAM channel weights of class ``k``.
    """
    if logits.dim() != 2 or pooled_features.dim() != 2:
        raise ValueError(
            "need logits (b, K) and pooled features (b, C), got "
            f"{tuple(logits.shape)} and {tuple(pooled_features.shape)}"
        )
    if not logits.shape[0] == pooled_features.shape[0] == labels.shape[0]:
        raise ValueError("logits, pooled features and labels need the same batch size")
    residual = torch.softmax(logits, dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return residual.t() @ pooled_features / logits.shape[0]


def class_relation(activation: torch.Tensor) -> torch.Tensor:
    """Row-normalised class Gram ``normalize_rows(M M^T)`` of a ``(K, C)`` class activation
    matrix; returns ``(K, K)``."""
    if activation.dim() != 2:
        raise ValueError(f"need a (classes, channels) matrix, got {tuple(activation.shape)}")
    return F.normalize(activation @ activation.t(), p=2, dim=1)


def semantic_distance(
    student_activation: torch.Tensor, teacher_activation: torch.Tensor
) -> torch.Tensor:
    """``||R_t - R_s||_F^2 / K^2`` between class relations of two ``(K, C)`` class activation
    matrices (DisWOT semantic metric with class-wise Grams; see the module docstring)."""
    if student_activation.shape[0] != teacher_activation.shape[0]:
        raise ValueError(
            "student and teacher need the same number of classes, got "
            f"{student_activation.shape[0]} and {teacher_activation.shape[0]}"
        )
    classes = student_activation.shape[0]
    diff = class_relation(teacher_activation) - class_relation(student_activation)
    return diff.pow(2).sum() / classes**2
