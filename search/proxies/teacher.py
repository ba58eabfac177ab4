"""DisWOT proxies (Dong et al., CVPR 2023): how similar an untrained student's sample relations
and class activations are to a trained teacher's, on the same mini-batch. ``needs_teacher``.

The math lives in :mod:`slimline.search.diswot` (shared with the distillation losses). The student is
scored at its random initialisation in train mode (batch-statistics BatchNorm); the teacher runs
in eval mode with its trained statistics, and its train/eval flags are restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from slimline.search.diswot import class_activation_matrix, relation_distance, semantic_distance
from slimline.search.features import Taps, find_classifier, find_global_pool, tap
from slimline.search.proxies.base import Proxy, ProxyInputs, register_proxy

__all__ = ["DiswotRelation", "DiswotSemantic"]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _relation_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pre-GAP feature map when the model pools globally, else the classifier's input."""
    if find_global_pool(model) is not None:
        return tap(model, x, pre_pool=True).pre_pool
    return tap(model, x, penultimate=True).penultimate


class _DiswotProxy(Proxy):
    needs_teacher = True

    def applicable(self, model: nn.Module) -> bool:
        return find_classifier(model) is not None

    def why_not_applicable(self, model: nn.Module) -> str:
        return "it has no nn.Linear classifier to read features and class activations from"

    def _both(self, model: nn.Module, inputs: ProxyInputs, fn) -> tuple:
        assert inputs.teacher is not None  # checked by Proxy.score
        model.train()
        with torch.no_grad():
            student = fn(model, inputs.x)
            with _eval_mode(inputs.teacher) as teacher:
                reference = fn(teacher, inputs.x)
        return student, reference


@register_proxy
class DiswotRelation(_DiswotProxy):
    """``-||G_t - G_s||_F^2 / b^2`` between row-normalised sample Grams of the pre-GAP features
    (DisWOT's relation similarity). 0 is identical relations; higher = better."""

    name = "diswot_relation"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        student, teacher = self._both(model, inputs, _relation_features)
        return -float(relation_distance(student, teacher))


@register_proxy
class DiswotSemantic(_DiswotProxy):
    """``-||R_t - R_s||_F^2 / K^2`` between the class relations of the students' and teacher's
    Grad-CAM class activation matrices, the cross-entropy gradient of the classifier weight
    (DisWOT's semantic similarity, class-wise form; see :mod:`slimline.search.diswot`). Higher = better."""

    name = "diswot_semantic"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        def activation(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
            found: Taps = tap(net, x, penultimate=True)
            return class_activation_matrix(found.logits, found.penultimate, inputs.y)

        student, teacher = self._both(model, inputs, activation)
        return -float(semantic_distance(student, teacher))
