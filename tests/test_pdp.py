"""PDP (slimline.compress.prune.pdp, stage prune.pdp): threshold, soft mask, exact hard sparsity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimline
from slimline.compress.prune.nm import nm_violations
from slimline.compress.prune.pdp import PDPMask, PDPPruner, pdp_soft_mask, pdp_threshold


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )


def _train_a_little(model: nn.Module, pruner: PDPPruner, epochs: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(epochs):
        pruner.start_epoch(epoch)
        for _ in range(3):
            loss = model(torch.randn(8, 16)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_mask_is_one_half_at_the_threshold_and_threshold_is_the_midpoint() -> None:
    scores = torch.arange(1.0, 11.0)[torch.randperm(10)]
    threshold = pdp_threshold(scores, 0.3)  # pruned 1, 2, 3; kept from 4
    assert threshold == pytest.approx(3.5)
    assert float(pdp_soft_mask(threshold, threshold, 0.1)) == 0.5
    mask = pdp_soft_mask(scores, threshold, 0.1)
    assert ((mask > 0.5) == (scores > 3.5)).all()


@pytest.mark.parametrize("mode", ["unstructured", "channel"])
def test_hard_sparsity_per_layer_equals_its_target(mode: str) -> None:
    model = _mlp()
    pruner = PDPPruner(model, 0.75, mode, epsilon=0.5, warmup_epochs=1)
    _train_a_little(model, pruner, 3)
    masks = pruner.finish()
    for name, weight in dict(model.named_parameters()).items():
        if name not in masks:
            continue
        target = pruner.layer_targets[name]
        if mode == "channel":
            pruned_rows = int((weight.detach().abs().sum(1) == 0).sum())
            assert pruned_rows == int(target * weight.shape[0])
        else:
            assert int((weight == 0).sum()) == int(target * weight.numel())
    total = sum(m.numel() for m in masks.values())
    if mode == "unstructured":  # one global sort: the layers add up to the global target
        assert sum(int((~m).sum()) for m in masks.values()) == pytest.approx(0.75 * total, abs=3)


def test_nm_groups_have_exactly_n_nonzeros() -> None:
    model = _mlp()
    pruner = PDPPruner(model, 0.0, "nm", n=2, m=4, warmup_epochs=0)
    _train_a_little(model, pruner, 2)
    masks = pruner.finish()
    for name, weight in dict(model.named_parameters()).items():
        if name in masks:
            groups = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all() and nm_violations(weight, 2, 4) == 0


def test_pdp_adds_no_parameters_and_gradients_reach_the_weights() -> None:
    model = _mlp()
    before = sum(p.numel() for p in model.parameters())
    count = len(list(model.parameters()))
    pruner = PDPPruner(model, 0.5, warmup_epochs=0)
    pruner.start_epoch(0)
    assert sum(p.numel() for p in model.parameters()) == before
    assert len(list(model.parameters())) == count
    assert not list(PDPMask("unstructured", 0.5, 0.1).parameters())
    model(torch.randn(4, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    pruner.finish()
    assert "0.weight" in dict(model.named_parameters())  # plain names again


def test_prune_pdp_stage_keeps_masks_downstream(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["stages"] = [
        {"id": "train", "uses": "train", "with": {"epochs": 1}},
        {
            "id": "pdp",
            "uses": "prune.pdp",
            "with": {
                "sparsity": 0.8,
                "epochs": 3,
                "warmup_epochs": 1,
                "epsilon": 0.8,
                "distill": True,
            },
        },
        {"id": "tune", "uses": "train", "with": {"epochs": 1}},
    ]
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    metrics = result.record("pdp").metrics
    assert metrics["sparsity"] == pytest.approx(0.8, abs=0.01)
    tuned = result.artifact("tune")
    for name, mask in tuned.masks.items():
        assert (dict(tuned.model.named_parameters())[name][~mask] == 0).all()
