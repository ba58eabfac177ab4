"""UDFC: the closed forms against numerical minima, exact repair of an exact linear
combination, no-op settings, prune sites of the zoo models, data-free enforcement, and a tiny
pipeline through int8 export."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import slimline
from slimline.artifact import Artifact
from slimline.compress.prune.datafree_sites import ChannelFilters, find_prune_sites
from slimline.compress.prune.neuron_merging import prune_sites
from slimline.compress.quant.datafree import weight_spec
from slimline.compress.quant.udfc import udfc_compress
from slimline.compress.quant.udfc_scales import (
    pruning_loss,
    pruning_scales,
    quantization_loss,
    quantization_scales,
)
from slimline.models import build_model
from slimline.stage import DataAccessError, data_free, get_stage, no_data
from tests.datafree_models import calibrate_bn, combination_net, tripwire_context

RECIPE = Path(__file__).parent.parent / "recipes" / "datafree.yaml"


def _random_filters(channels: int, size: int, seed: int) -> ChannelFilters:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, size, generator=generator, dtype=torch.float64)
    scale = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.3
    shift = torch.randn(channels, generator=generator, dtype=torch.float64)
    return ChannelFilters(weight, scale, shift, weight)


@pytest.mark.parametrize(("channels", "size"), [(6, 20), (12, 5)])  # full rank; rank-deficient
def test_pruning_scales_minimise_the_stated_loss(channels: int, size: int) -> None:
    filters = _random_filters(channels, size, seed=channels)
    removed = torch.tensor([1, channels - 2])
    kept = torch.tensor([i for i in range(channels) if i not in removed.tolist()])
    closed = pruning_scales(filters, removed, alpha1=0.01)
    for row, j in enumerate(removed.tolist()):
        s = torch.zeros(len(kept), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [s],
            max_iter=60,
            history_size=30,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def step(s=s, optimizer=optimizer, j=j) -> torch.Tensor:
            optimizer.zero_grad()
            loss = pruning_loss(s, filters, j, kept, 0.01)
            loss.backward()
            return loss

        optimizer.step(step)
        numeric = float(pruning_loss(s.detach(), filters, j, kept, 0.01))
        exact = float(pruning_loss(closed[row], filters, j, kept, 0.01))
        assert exact <= numeric + 1e-9 * max(1.0, numeric)
        assert exact == pytest.approx(numeric, rel=1e-6, abs=1e-9)
        if size > len(kept):  # unique minimiser: the scales themselves agree
            assert torch.allclose(closed[row], s.detach(), atol=1e-6)


def test_quantization_scale_is_the_minimiser_not_one() -> None:
    generator = torch.Generator().manual_seed(0)
    folded = torch.randn(8, 27, generator=generator)
    quantized = weight_spec(folded, 3).fake_quant(folded)
    shift = torch.randn(8, generator=generator)
    closed = quantization_scales(folded, quantized, shift, alpha2=0.008)
    grid = torch.linspace(0.5, 1.5, 100_001, dtype=torch.float64)
    for m in range(8):
        losses = torch.stack(
            [quantization_loss(s, folded[m], quantized[m], shift[m], 0.008) for s in grid[::100]]
        )
        coarse = grid[::100][int(torch.argmin(losses))]
        fine = grid[(grid - coarse).abs() <= 1e-3]
        fine_losses = torch.stack(
            [quantization_loss(s, folded[m], quantized[m], shift[m], 0.008) for s in fine]
        )
        best = fine[int(torch.argmin(fine_losses))]
        assert float(closed[m]) == pytest.approx(float(best), abs=2e-5)
        at_closed = quantization_loss(closed[m], folded[m], quantized[m], shift[m], 0.008)
        assert at_closed <= fine_losses.min() + 1e-12
        assert at_closed < quantization_loss(1.0, folded[m], quantized[m], shift[m], 0.008)
    assert not torch.allclose(closed, torch.ones_like(closed))


@pytest.mark.parametrize(
    ("combination", "always_active"), [((0.5, -0.2, 0.4), True), ((0.0, 0.8, 0.0), False)]
)
def test_udfc_repairs_an_exact_linear_combination_exactly(combination, always_active) -> None:
    model, pruned = combination_net(combination, always_active=always_active)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        reference = model(x)
    repaired, plain = copy.deepcopy(model), copy.deepcopy(model)
    result = udfc_compress(repaired, x[:1], prune_ratio=0.25, weight_bits=None)
    assert result.sites["0"]["removed"] == [pruned]
    assert repaired[0].out_channels == len(combination) and repaired[3].in_channels == 3
    prune_sites(plain, x[:1], 0.25, compensation="none")
    with torch.no_grad():
        error = (repaired(x) - reference).abs().max() / reference.abs().max()
        plain_error = (plain(x) - reference).abs().max() / reference.abs().max()
    assert error < 1e-5
    assert plain_error > 1e-2


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return calibrate_bn(build_model("resnet", width=8), (1, 8, 8))


def test_zero_ratio_and_high_bits_leave_the_network_nearly_unchanged(resnet) -> None:
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = resnet(x)
        unpruned = copy.deepcopy(resnet)
        udfc_compress(unpruned, x[:1], prune_ratio=0.0, weight_bits=None)
        assert torch.equal(unpruned(x), reference)
        for bits in (8, 16):
            model = copy.deepcopy(resnet)
            # A full-range target: this checks the PyTorch grids, not a CPU's kernels.
            result = udfc_compress(
                model, x[:1], prune_ratio=0.0, weight_bits=bits, target="x86-vnni"
            )
            assert not result.sites and len(result.compensated) == 3
            out = model(x)
            # What is left is the 8-bit activation grid (weights at 16 bits are exact).
            relative = (out - reference).norm() / reference.norm()
            assert relative < 0.03, (bits, relative)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("resnet", (1, 1, 8, 8), {"layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"}),
        (
            "mobilenetv2",
            (1, 1, 8, 8),
            {f"features.{i}.conv.0" for i in range(3, 8)} | {"features.8"},
        ),
        ("cnn1d", (1, 1, 40), {"features.0", "features.3", "features.6"}),
    ],
)
def test_prune_sites_of_the_zoo(name: str, shape: tuple[int, ...], expected: set[str]) -> None:
    model = build_model(name).eval()
    search = find_prune_sites(model, torch.randn(shape))
    assert {site.name for site in search.sites} == expected
    kinds = {site.name: site.kind for site in search.sites}
    if name == "mobilenetv2":  # the expand conv and its depthwise conv go together
        assert kinds["features.3.conv.0"] == "depthwise" and kinds["features.8"] == "direct"
        calibrate_bn(model, shape[1:])
        udfc_compress(model, torch.randn(shape), prune_ratio=0.5, weight_bits=None)
        block = model.features[4].conv
        assert block[0].out_channels == block[3].in_channels == block[3].out_channels
        assert block[3].groups == block[3].out_channels == block[6].in_channels == 32
        assert model(torch.randn(2, *shape[1:])).shape == (2, 10)


def test_data_free_stages_never_read_the_data(resnet, tmp_path) -> None:
    spec = {"name": "resnet", "with": {"width": 8}}
    for uses, extra in [
        ("compress.udfc", {}),
        ("prune.neuron_merging", {}),
        ("prune.plain_channels", {}),
        ("quant.dfq", {}),
        ("quant.datafree", {}),
    ]:
        stage = get_stage(uses)
        source = Artifact(model=copy.deepcopy(resnet), model_spec=spec, input_shape=(1, 8, 8))
        ctx = tripwire_context(uses, uses, tmp_path)
        out = stage.function(ctx, [source], stage.params(**extra))
        assert out.model is not resnet
    calls = []
    ctx = tripwire_context("probe", "probe", tmp_path)
    ctx.data_loader = lambda: calls.append(1) or "dataset"

    @data_free
    def peeks(ctx, inputs, p):
        return ctx.data

    with pytest.raises(DataAccessError, match="data-free"):
        peeks(ctx, [], None)
    assert ctx.data == "dataset" and calls == [1]  # restored afterwards
    with no_data(ctx), pytest.raises(DataAccessError):
        _ = ctx.data
    assert ctx.data == "dataset"


def test_datafree_recipe_runs_through_int8_export() -> None:
    """recipes/datafree.yaml, shrunk: UDFC branch exported int8 and timed, the plain branch and
    DFQ scored against the trained model."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["with"] = {"depth": 8, "width": 8}
    # The fp32 export + profile branch is the standard path, tested elsewhere.
    recipe["stages"] = [s for s in recipe["stages"] if not s["id"].endswith("_fp32")]
    for stage in recipe["stages"]:
        if stage["uses"] == "train":
            stage["with"] = {"epochs": 1, "lr": 1e-2}
        if stage["uses"] == "profile.latency":
            stage["with"] = {"batch_sizes": [1], "runs": 3, "warmup": 1, "per_op": False}
    with tempfile.TemporaryDirectory() as run_dir:
        result = slimline.run(recipe, run_dir=run_dir, progress=False)
    udfc = result.record("udfc").metrics
    assert udfc["channels_after"] < udfc["channels_before"] and udfc["data_used"] is False
    assert udfc["layer_channels"]["layer1.0.conv1"] == 6  # 8 channels, 30% removed
    assert udfc["params_after"] < udfc["params_before"]
    export = result.record("export_udfc").metrics
    assert export["format"] == "int8" and export["weight_levels_max"] <= 2**6 - 1
    assert export["top1_agreement"] >= 0.98
    assert result.record("profile_udfc").metrics["median_ms"] > 0
    for branch in ("eval_udfc", "eval_plain", "eval_dfq"):
        metrics = result.record(branch).metrics
        assert metrics["reference"] == "train" and metrics["accuracy"] > 0.3


def test_udfc_artifact_reloads_with_fewer_channels(resnet, tmp_path) -> None:
    model = copy.deepcopy(resnet)
    result = udfc_compress(model, torch.randn(1, 1, 8, 8), prune_ratio=0.5, weight_bits=6)
    assert model.layer2[0].conv1.out_channels == 8  # 16 channels, half removed
    artifact = Artifact(
        model=model,
        model_spec={"name": "resnet", "with": {"width": 8}},
        input_shape=(1, 8, 8),
        state={"quantization": result.quant.state.to_dict()},
    )
    artifact.save(tmp_path / "udfc")
    loaded = Artifact.load(tmp_path / "udfc")
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), model(x))
    assert loaded.model.layer2[0].conv1.out_channels == 8


@pytest.mark.parametrize(("channels", "size"), [(6, 20), (12, 5)])  # full rank; rank-deficient
def test_mean_preserving_scales_are_the_constrained_minimum(channels: int, size: int) -> None:
    filters = _random_filters(channels, size, seed=channels + 1)
    means = torch.rand(channels, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    removed = torch.tensor([0, channels - 1])
    kept = torch.arange(1, channels - 1)
    free = pruning_scales(filters, removed, alpha1=0.01)
    constrained = pruning_scales(filters, removed, alpha1=0.01, means=means)
    for row, j in enumerate(removed.tolist()):
        s = constrained[row].clone().requires_grad_(True)
        assert float(constrained[row] @ means[kept]) == pytest.approx(float(means[j]), rel=1e-10)
        assert float(free[row] @ means[kept]) != pytest.approx(float(means[j]), rel=1e-3)
        loss = pruning_loss(s, filters, j, kept, 0.01)
        (gradient,) = torch.autograd.grad(loss, s)
        # Karush-Kuhn-Tucker: at the constrained minimum the gradient is parallel to the means.
        c = means[kept]
        along = gradient - (gradient @ c) / (c @ c) * c
        assert float(along.norm()) <= 1e-8 * max(1.0, float(gradient.norm()))
        unconstrained = float(pruning_loss(free[row], filters, j, kept, 0.01))
        assert float(loss.detach()) >= unconstrained - 1e-12


def test_mean_preserving_keeps_the_consumers_mean_input(resnet) -> None:
    # BN statistics of N(0, 1) inputs (the fixture): the clipped-normal means are what the
    # consumer sees on such inputs, up to the Gaussian approximation of the pre-activations.
    x = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    consumer = "layer2.0.conv2"

    def consumer_mean(model: nn.Module) -> torch.Tensor:
        captured = []
        handle = model.get_submodule(consumer).register_forward_hook(
            lambda m, a, out: captured.append(out.mean((0, 2, 3)))
        )
        with torch.no_grad():
            model(x)
        handle.remove()
        return captured[0]

    reference = consumer_mean(resnet)
    shifts = {}
    for preserving in (False, True):
        model = copy.deepcopy(resnet)
        udfc_compress(model, x[:1], prune_ratio=0.5, weight_bits=None, mean_preserving=preserving)
        shifts[preserving] = float((consumer_mean(model) - reference).norm() / reference.norm())
    assert shifts[True] < 0.5 * shifts[False], shifts
