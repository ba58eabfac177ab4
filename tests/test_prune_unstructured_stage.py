"""``prune.unstructured`` and the rate-distortion pieces on a trained model: DP beats the
baselines, additivity holds, budgets are exact, masks compose, bad input fails clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import slimline
from slimline.compress.prune import prunable_weights
from slimline.compress.prune.allocation import keep_budget, threshold_allocation, uniform_allocation
from slimline.compress.prune.distortion import (
    IncrementalForward,
    additivity,
    distortion_curves,
    joint_distortion,
)
from slimline.compress.prune.importance import MagnitudeImportance
from slimline.compress.prune.inputs import bn_matched_inputs
from slimline.compress.prune.rate_distortion import rd_allocation
from slimline.data import load_dataset
from slimline.models import build_model
from slimline.recipe import RecipeError
from slimline.training import TrainParams, fit

GRID = np.linspace(0.0, 1.0, 51)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor]:
    """A small ResNet (BatchNorm, residual adds) trained on digits for a few epochs."""
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model("resnet", num_classes=10, in_channels=1, input_size=(8, 8), width=8)
    fit(model, data, TrainParams(epochs=6))
    return model.eval(), data.x_test


def test_incremental_forward_matches_full_forward(trained) -> None:
    model, x = trained
    forward = IncrementalForward(model, x[:16])
    assert forward.incremental
    weight = model.layer2[0].conv1.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(0.5)
        try:
            assert torch.allclose(forward.output("layer2.0.conv1"), model(x[:16]), atol=1e-6)
        finally:
            weight.copy_(saved)


@pytest.mark.parametrize("name, size", [("gru", (40,)), ("vit", (8, 8))])
def test_curves_equal_naive_single_layer_pruning(name: str, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, in_channels=1, input_size=size).eval()
    names = list(prunable_weights(model))
    x = torch.randn(8, 1, *size)
    curves = distortion_curves(model, names, x, [0.0, 0.3, 0.9], reduction="max")
    for i, layer in enumerate(names):
        for k in (1, 2):
            counts = {layer: int(curves.numel[i] - curves.kept[i, k])}
            naive = joint_distortion(model, counts, x, reduction="max")
            assert curves.distortion[i, k] == pytest.approx(naive, rel=1e-5, abs=1e-12)
    assert (curves.distortion[:, 0] == 0).all()


def test_dp_beats_uniform_and_global_on_test_distortion(trained) -> None:
    model, x_test = trained
    names = list(prunable_weights(model))
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    total = sum(w.numel() for w in weights.values())
    inputs = bn_matched_inputs(model, (1, 8, 8), 64, steps=100)  # data-free
    curves = distortion_curves(model, names, inputs, GRID)
    for sparsity in (0.5, 0.7, 0.9):
        budget = keep_budget(total, sparsity)
        result = rd_allocation(model, names, inputs, budget, levels=GRID, curves=curves)
        assert sum(w.numel() - result.counts[n] for n, w in weights.items()) == budget
        dp = joint_distortion(model, result.counts, x_test)
        uniform = joint_distortion(model, uniform_allocation(weights, sparsity), x_test)
        magnitude = threshold_allocation(MagnitudeImportance()(weights), sparsity)
        assert dp < uniform and dp < joint_distortion(model, magnitude, x_test), sparsity


def test_additivity_is_high_on_a_trained_model(trained) -> None:
    model, x_test = trained
    names = list(prunable_weights(model))
    curves = distortion_curves(model, names, x_test[:64], GRID)
    check = additivity(model, curves, x_test[:64], samples=24, max_level=0.5)
    assert check.pearson > 0.9
    assert len(check.joint) == len(check.summed) == 24


def _recipe(**prune_with) -> dict:
    return {
        "name": "unstructured",
        "seed": 0,
        "model": {"name": "mlp", "with": {"hidden": [32]}},
        "data": {"name": "digits"},
        "stages": [
            {"id": "train", "uses": "train", "with": {"epochs": 2}},
            {"id": "pre", "uses": "prune.magnitude", "with": {"sparsity": 0.3}},
            {"id": "prune", "uses": "prune.unstructured", "with": prune_with},
            {"id": "eval", "uses": "eval"},
        ],
    }


def test_stage_records_sparsity_metrics_chart_and_composes_masks(tmp_path) -> None:
    recipe = _recipe(sparsity=0.7, grid=21, samples=32, additivity_samples=8, refine=1)
    result = slimline.run(recipe, run_dir=tmp_path, progress=False)
    pre, pruned = result.artifact("pre"), result.artifact("prune")
    metrics = pruned.metrics
    total = sum(w.numel() for w in prunable_weights(pruned.model).values())
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(pruned.model).values())
    assert zeros == int(0.7 * total) and metrics["sparsity"] == pytest.approx(zeros / total)
    assert set(metrics["layer_sparsity"]) == set(prunable_weights(pruned.model))
    assert metrics["distortion_data"] == "random"  # the MLP has no BatchNorm
    assert -1.0 <= metrics["additivity"] <= 1.0 and metrics["distortion"] > 0
    assert pruned.state["pruning"]["allocation"] == "dp"
    for name, mask in pre.masks.items():  # earlier pruning is never undone
        assert not pruned.masks[name][~mask].any()
    for key in ("layer_sparsity_png", "distortion_curves"):
        assert pruned.files[key].is_file()
    assert pruned.files["layer_sparsity_png"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("allocation, score", [("uniform", "magnitude"), ("global", "lamp")])
def test_baseline_allocations_run_as_a_stage(tmp_path, allocation: str, score: str) -> None:
    recipe = _recipe(sparsity=0.6, allocation=allocation, score=score)
    result = slimline.run(recipe, run_dir=tmp_path, progress=False)
    assert result.artifact("prune").metrics["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_sparsity_out_of_range_names_the_recipe_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nmodel: {name: mlp}\ndata: {name: digits}\nstages:\n"
        "  - id: prune\n    uses: prune.unstructured\n    with:\n      sparsity: 1.0\n"
    )
    with pytest.raises(RecipeError) as info:
        slimline.validate(path)
    assert info.value.line == 8 and "[0.0, 1.0)" in str(info.value)


@pytest.mark.parametrize(
    "prune_with, message",
    [
        ({"sparsity": 0.9, "grid": [0.0, 0.5]}, "cannot be met"),
        ({"allocation": "global", "score": "dimap"}, "module 'qkv'.*matches no prunable"),
        ({"include": "^nothing"}, "match no prunable weight"),
        ({"distortion_data": "bn"}, "has none"),
    ],
)
def test_bad_input_fails_with_a_clear_message(tmp_path, prune_with, message) -> None:
    with pytest.raises(Exception, match=message):
        slimline.run(_recipe(**prune_with), run_dir=tmp_path, progress=False)


def test_bad_params_are_rejected_before_running() -> None:
    for prune_with, key in [
        ({"score": "lamp"}, "score"),  # lamp scores only matter for allocation=global
        ({"grid": [0.5, 0.2]}, "grid"),
        ({"modules": [{"name": "x"}]}, "modules[0]"),
        ({"include": "("}, "include"),
    ]:
        with pytest.raises(RecipeError, match=key.replace("[", r"\[")):
            slimline.validate(_recipe(**prune_with))


def test_nan_weights_fail_clearly(tmp_path) -> None:
    from slimline.artifact import Artifact
    from slimline.compress.prune.unstructured import UnstructuredConfig
    from slimline.stage import StageContext, StageFailed
    from slimline.stages.prune import prune_unstructured

    model = build_model("mlp", num_classes=10, in_channels=1, input_size=(8, 8))
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    artifact = Artifact(model=model, model_spec={"name": "mlp"}, input_shape=(1, 8, 8))
    ctx = StageContext("prune", "prune.unstructured", 0, tmp_path, lambda: None)
    with pytest.raises(StageFailed, match="'head.weight' has NaN"):
        prune_unstructured(ctx, [artifact], UnstructuredConfig())
