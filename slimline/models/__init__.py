"""Reference model zoo, timm-style: ``@register_model`` builders looked up by name.

Every builder takes the same leading keyword arguments, filled from the dataset unless a recipe
sets them: ``num_classes``, ``in_channels`` and ``input_size`` (spatial size: ``(H, W)`` for
images, ``(L,)`` for sequences), followed by its family's own arguments. One file per family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from slimline.registry import Registry, first_doc_line

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under ``name`` (decorator)."""
    return MODELS.register(name)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names raise with the closest known name."""
    return MODELS.get(name)(**kwargs)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


def describe_models() -> list[tuple[str, str]]:
    return [(name, first_doc_line(MODELS.get(name))) for name in MODELS.names()]


# Importing the family modules registers their builders.
from slimline.models import (  # noqa: E402,F401
    cnn1d,
    flexnet,
    gru,
    mlp,
    mobilenetv2,
    resnet,
    seqformer,
    vit,
)
