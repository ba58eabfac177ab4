"""Importance scores: magnitude, LAMP (Lee et al. 2021) and module-aware DIMAP (He & Zhou 2024)."""

from __future__ import annotations

import pytest
import torch

from slimline.compress.prune import prunable_weights
from slimline.compress.prune.allocation import masks_from_counts, threshold_allocation
from slimline.compress.prune.importance import (
    VIT_MODULES,
    DIMAPImportance,
    LAMPImportance,
    MagnitudeImportance,
    ModuleRule,
    assign_modules,
    lamp_scores,
    make_importance,
)
from slimline.models import build_model


def test_lamp_matches_the_definition_by_hand() -> None:
    # squares 9, 1, 4, 0.25; each divided by the sum of the squares at least as large
    w = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    expected = torch.tensor([[9 / 9, 1 / 14], [4 / 13, 0.25 / 14.25]], dtype=torch.float64)
    assert torch.allclose(LAMPImportance()(w), expected)
    assert torch.allclose(lamp_scores(w), expected)


def test_lamp_ties_share_one_score_and_zeros_score_zero() -> None:
    w = torch.tensor([1.0, -1.0, 2.0, 0.0])
    # both |1|s: 1 / (1 + 1 + 4); the largest scores 1; a zero scores 0
    assert lamp_scores(w).tolist() == pytest.approx([1 / 6, 1 / 6, 1.0, 0.0])
    assert lamp_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_magnitude_norms_and_mapping_call() -> None:
    w = torch.tensor([-3.0, 2.0])
    assert MagnitudeImportance(p=1)(w).tolist() == [3.0, 2.0]
    assert MagnitudeImportance(p=2)(w).tolist() == [9.0, 4.0]
    assert MagnitudeImportance(p=1, normalizer="max")(w).tolist() == [1.0, 2 / 3]
    scores = make_importance("lamp")({"a": w, "b": torch.tensor([1.0])})
    assert set(scores) == {"a", "b"} and scores["b"].item() == 1.0
    with pytest.raises(ValueError, match="'a' has NaN"):
        MagnitudeImportance()({"a": torch.tensor([float("nan")])})


def test_lamp_global_threshold_keeps_every_layers_largest_weight() -> None:
    torch.manual_seed(0)
    weights = {"big": torch.randn(200) * 10, "small": torch.randn(50) * 0.01}
    counts = threshold_allocation(LAMPImportance()(weights), 0.95)
    assert sum(counts.values()) == int(0.95 * 250)
    assert counts["small"] < 50  # global magnitude would wipe out the small layer
    assert threshold_allocation(MagnitudeImportance()(weights), 0.95)["small"] == 50


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        "vit", num_classes=10, in_channels=1, input_size=(8, 8), dim=16, depth=3, heads=2
    )


def test_dimap_modules_by_regex_leave_embedding_and_head_dense() -> None:
    model = _vit()
    names = list(prunable_weights(model))
    module_of = assign_modules(model, names, VIT_MODULES)
    assert "patch_embed.weight" not in module_of and "head.weight" not in module_of
    assert module_of["blocks.1.attn.k.weight"] == "qkv"
    assert module_of["blocks.2.attn.proj.weight"] == "proj"
    assert module_of["blocks.0.mlp.fc2.weight"] == "mlp"
    by_op = assign_modules(model, names, [ModuleRule("convs", op="Conv2d")])
    assert by_op == {"patch_embed.weight": "convs"}
    with pytest.raises(ValueError, match="module 'nope'.*matches no prunable weight"):
        assign_modules(model, names, [ModuleRule("nope", regex=r"^nothing\.")])
    with pytest.raises(ValueError, match="exactly one"):
        ModuleRule("both", regex="a", op="Linear")


@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.85])
def test_dimap_one_threshold_per_module(sparsity: float) -> None:
    model = _vit()
    named = prunable_weights(model)
    module_of = assign_modules(model, list(named), VIT_MODULES)
    weights = {n: w.detach() for n, w in named.items() if n in module_of}
    importance = DIMAPImportance(module_of)
    counts = threshold_allocation(importance(weights), sparsity)
    masks = masks_from_counts(MagnitudeImportance()(weights), counts)
    eq10 = importance.eq10_scores(weights)
    for module in ("qkv", "proj", "mlp"):
        members = [n for n in weights if module_of[n] == module]
        size = sum(weights[n].numel() for n in members)
        pruned = sum(counts[n] for n in members)
        assert abs(pruned - sparsity * size) <= 1.0  # each module loses the target fraction
        removed = torch.cat([eq10[n][~masks[n]] for n in members])
        kept = torch.cat([eq10[n][masks[n]] for n in members])
        assert removed.max() <= kept.min()  # a single Eq. 10 threshold splits the module
    thresholds = importance.module_thresholds(weights, {n: ~m for n, m in masks.items()})
    assert set(thresholds) == {"qkv", "proj", "mlp"}
    assert len(set(thresholds.values())) == 3  # modules are not compared with each other
