"""Physically changed models (pruned channels, fewer heads, folded norms) survive save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimline.artifact import Artifact
from slimline.models import build_model
from slimline.structure import StructureError, apply_structure, structure_diff

SPEC = {"name": "resnet", "with": {"depth": 8, "width": 8, "num_classes": 10, "in_channels": 1,
                                   "input_size": [8, 8]}}


def _shrink_first_block(model: nn.Module, keep: int) -> None:
    """Drop output channels of layer1.0.conv1 (and its BN and conv2 inputs), by hand."""
    block = model.layer1[0]
    index = torch.arange(keep)
    with torch.no_grad():
        block.conv1.weight = nn.Parameter(block.conv1.weight[index].clone())
        block.conv1.out_channels = keep
        for name in ("weight", "bias"):
            setattr(block.bn1, name, nn.Parameter(getattr(block.bn1, name)[index].clone()))
        block.bn1.running_mean = block.bn1.running_mean[index].clone()
        block.bn1.running_var = block.bn1.running_var[index].clone()
        block.bn1.num_features = keep
        block.conv2.weight = nn.Parameter(block.conv2.weight[:, index].clone())
        block.conv2.in_channels = keep


def test_pruned_channels_roundtrip_through_artifact(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet", **SPEC["with"])
    _shrink_first_block(model, 5)
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    expected = model(x)
    Artifact(model=model, model_spec=dict(SPEC), input_shape=(1, 8, 8)).save(tmp_path)
    loaded = Artifact.load(tmp_path)
    assert loaded.model.layer1[0].conv1.out_channels == 5
    assert loaded.model_spec["structure"]["layer1.0.conv1"]["tensors"]["weight"] == [5, 8, 3, 3]
    assert torch.allclose(loaded.model.eval()(x), expected)


def test_unchanged_model_records_nothing(tmp_path) -> None:
    model = build_model("resnet", **SPEC["with"])
    Artifact(model=model, model_spec=dict(SPEC), input_shape=(1, 8, 8)).save(tmp_path)
    assert "structure" not in Artifact.load(tmp_path).model_spec


def test_identity_replacement_and_head_attribute() -> None:
    vit_args = {"num_classes": 10, "in_channels": 1, "input_size": [8, 8], "dim": 32, "heads": 4,
                "depth": 1}
    reference, model = build_model("vit", **vit_args), build_model("vit", **vit_args)
    model.blocks[0].attn.num_heads = 2
    model.blocks[0].attn.head_dim = 16
    model.norm = nn.Identity()
    diff = structure_diff(reference, model)
    assert diff["blocks.0.attn"]["attrs"] == {"num_heads": 2, "head_dim": 16}
    assert diff["norm"] == {"replace": "Identity"}
    rebuilt = apply_structure(build_model("vit", **vit_args), diff)
    assert isinstance(rebuilt.norm, nn.Identity) and rebuilt.blocks[0].attn.num_heads == 2


def test_unrecordable_change_is_refused() -> None:
    reference, model = build_model("mlp"), build_model("mlp")
    model.head = nn.Sequential(nn.Linear(128, 10))
    with pytest.raises(StructureError, match="'head' changed type Linear -> Sequential"):
        structure_diff(reference, model)
