"""Magnitude pruning (the baseline): exact sparsity, correct selection, masks survive training."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimline.compress.prune import layer_sparsity, magnitude, magnitude_masks, prunable_weights


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(144, 10), nn.ReLU(), nn.Linear(10, 3))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_global_prunes_exact_count_of_smallest(sparsity: float) -> None:
    model = _net()
    before = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    magnitude(model, sparsity)
    after = torch.cat([w.detach().flatten() for w in prunable_weights(model).values()])
    pruned = after == 0
    assert int(pruned.sum()) == int(sparsity * before.numel())
    if sparsity > 0:  # every pruned weight is no larger than every kept one
        assert before[pruned].max() <= before[~pruned].min()


def test_uniform_gives_each_layer_the_target() -> None:
    model = _net()
    magnitude(model, 0.6, scope="uniform")
    for name, value in layer_sparsity(model).items():
        n = dict(model.named_parameters())[name].numel()
        assert value == int(0.6 * n) / n


def test_global_differs_from_uniform_per_layer() -> None:
    model = _net()
    with torch.no_grad():
        model[5].weight.mul_(100)  # the classifier's weights are large: global keeps them
    masks = magnitude_masks(model, 0.5)
    assert masks["5.weight"].all() and (~masks["0.weight"]).any()


def test_include_exclude_and_biases_untouched() -> None:
    model = _net()
    assert set(prunable_weights(model)) == {"0.weight", "3.weight", "5.weight"}
    assert set(prunable_weights(model, exclude=r"^5\.")) == {"0.weight", "3.weight"}
    magnitude(model, 0.5, include=r"^3\.")
    assert layer_sparsity(model)["0.weight"] == 0 and layer_sparsity(model)["3.weight"] == 0.5
    assert (model[3].bias != 0).all()


def test_bad_inputs() -> None:
    model = _net()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        magnitude(model, 1.0)
    with pytest.raises(ValueError, match="no prunable weights"):
        magnitude(model, 0.5, include="nothing-matches")
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'3.weight' has NaN"):
        magnitude(model, 0.5)


def test_pipeline_finetune_keeps_pruned_weights_at_zero(tmp_path, tiny_recipe) -> None:
    import slimline

    tiny_recipe["stages"].insert(2, {"id": "finetune", "uses": "train", "with": {"epochs": 1}})
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    pruned, tuned = result.artifact("prune"), result.artifact("finetune")
    for name, mask in pruned.masks.items():
        weight = dict(tuned.model.named_parameters())[name]
        assert torch.all(weight[~mask] == 0)
        assert not torch.equal(weight, dict(pruned.model.named_parameters())[name])
    assert result.record("finetune").metrics["nonzero_parameters"] == \
        result.record("prune").metrics["nonzero_parameters"]
