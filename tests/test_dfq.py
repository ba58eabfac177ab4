"""DFQ and the data-free quantizer: equalization keeps the float function, high-bias absorption
and bias correction do what their equations say, BN-statistics ranges, and the shared state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from slimline.compress.prune.layer_chains import find_layer_chains
from slimline.compress.quant import QuantState, quantization_of
from slimline.compress.quant.bn_statistics import (
    DataFreeRangeError,
    bn_output_stats,
    clipped_normal_moments,
)
from slimline.compress.quant.datafree import quantize_datafree, weight_spec
from slimline.compress.quant.dfq import absorb_high_biases, equalize
from slimline.compress.quant.fold import conv_bn_pairs, fold_batchnorm
from slimline.models import build_model
from tests.datafree_models import calibrate_bn


def _folded_with_stats(model: nn.Module) -> tuple[nn.Module, dict]:
    stats = bn_output_stats(model, conv_bn_pairs(model), sigmas=6.0)
    fold_batchnorm(model)
    return model, stats


@pytest.mark.parametrize(
    ("name", "shape", "tolerance"),
    [
        ("resnet", (1, 8, 8), 1e-5),
        ("cnn1d", (1, 40), 1e-5),
        # ReLU6 channels are rescaled only where the BN statistics put them below the clip; the
        # Gaussian model under-estimates the tails of some depthwise outputs, so a few values that
        # were clipped at 6 no longer are (exact for ReLU networks).
        ("mobilenetv2", (1, 8, 8), 0.1),
    ],
)
def test_equalization_keeps_the_fp32_function(name, shape, tolerance) -> None:
    torch.manual_seed(0)
    model, stats = _folded_with_stats(calibrate_bn(build_model(name), shape))
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(x)
        chains = list(find_layer_chains(model).values())
        before = {c.layer: model.get_submodule(c.layer).weight.detach().clone() for c in chains}
        assert equalize(model, chains, stats) == len(chains) > 0
        out = model(x)
    assert (out - reference).abs().max() / reference.abs().max() < tolerance
    changed = [n for n, w in before.items() if not torch.equal(w, model.get_submodule(n).weight)]
    assert changed  # it did rescale something
    if name == "resnet":  # equalized ranges: max|W1[c]| == max|W2[:, c]| for every pair
        for chain in chains:
            first = model.get_submodule(chain.layer).weight.flatten(1).abs().amax(1)
            second = model.get_submodule(chain.consumer).weight.transpose(0, 1)
            assert torch.allclose(first, second.flatten(1).abs().amax(1), rtol=1e-4)


def test_high_bias_absorption_is_exact_when_channels_stay_active() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([5.0, 4.0, 0.0, 6.0, -1.0, 3.0]))
        model[1].weight.fill_(0.5)
    model.eval()
    model, stats = _folded_with_stats(model)
    x = torch.rand(16, 3, 4, 4) * 0.02 - 0.01  # tiny inputs: pre-activations stay near beta
    with torch.no_grad():
        reference = model(x)
        chains = list(find_layer_chains(model).values())
        assert absorb_high_biases(model, chains, stats) == 1
        assert torch.allclose(model(x), reference, atol=1e-5)
    # beta - 3 gamma left in the layer: 5 - 1.5 = 3.5 moved for the first channel, none for -1.
    assert float(stats["0"].mean[0]) == pytest.approx(1.5)
    assert float(stats["0"].mean[4]) == pytest.approx(-1.0)


def test_bias_correction_restores_the_expected_output() -> None:
    """Eq. 17 on the second layer: with the float hidden activations h as input, the quantized
    layer's mean output W~ h + b' matches the float W h + b; uncorrected it is off by
    (W~ - W) E[h]. (E[h] comes from the BN statistics, not from these samples.)"""
    torch.manual_seed(0)
    model = calibrate_bn(
        nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)), (8,)
    )
    x = torch.randn(50_000, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model[:3](x)
        reference = model[3](hidden).mean(0)
        shifts = {}
        for correct in (False, True):
            quantized = copy.deepcopy(model)
            quantize_datafree(quantized, weight_bits=3, correct_bias=correct)
            layer = quantized[3]
            shifts[correct] = float(
                (hidden @ layer.weight.T + layer.bias).mean(0).sub(reference).abs().max()
            )
    assert shifts[False] > 0.02
    assert shifts[True] < 0.1 * shifts[False]


def test_clipped_normal_moments_match_sampling() -> None:
    mean, std = torch.tensor([0.5, -1.0, 3.0, 2.0]), torch.tensor([1.0, 2.0, 2.0, 0.0])
    samples = mean + std * torch.randn(400_000, 4, generator=torch.Generator().manual_seed(5))
    for low, high in ((0.0, float("inf")), (0.0, 6.0), (-1.0, 1.0)):
        first, spread = clipped_normal_moments(mean, std, low, high)
        clipped = samples.clamp(low, high)
        assert torch.allclose(first.float(), clipped.mean(0), atol=0.02)
        assert torch.allclose(spread.float(), clipped.std(0), atol=0.02)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_grids(symmetric, per_channel) -> None:
    weight = torch.randn(6, 4, 3, 3) + 0.3
    spec = weight_spec(weight, 4, per_channel=per_channel, symmetric=symmetric)
    assert spec.bits == 4 and spec.per_channel == per_channel
    quantized = spec.fake_quant(weight)
    step = spec.scale.max()
    assert (quantized - weight).abs().max() <= step / 2 + 1e-6
    assert spec.on_grid(quantized)
    if symmetric:
        assert int(spec.zero_point.abs().max()) == 0


def test_datafree_state_ranges_and_dfq_in_the_shared_format() -> None:
    torch.manual_seed(0)
    model = calibrate_bn(build_model("resnet", width=8), (1, 8, 8))
    result = quantize_datafree(
        model, weight_bits=6, equalize=True, absorb_high_bias=True, correct_bias=True, method="dfq"
    )
    assert quantization_of(model) is result.state and result.ranges == "bn statistics"
    assert QuantState.from_dict(result.state.to_dict()).to_dict() == result.state.to_dict()
    assert result.dfq["equalized"] == 3 and result.dfq["bias_corrected"]
    levels = {spec.levels for name, spec in result.state.weights.items() if name.endswith("weight")}
    assert levels == {2**6 - 1}
    after_relu = result.state.activations["layer1.0.relu1:output"]
    assert int(after_relu.zero_point) == 0  # ReLU output: the grid starts at zero
    assert result.state.info["calibration_samples"] == 0


def test_unsupported_op_names_the_node() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.sigmoid(self.norm(self.conv(x)))
            return self.head(x.mean((2, 3)))

    model = calibrate_bn(Scaled(), (1, 6, 6))
    with pytest.raises(DataFreeRangeError, match="sigmoid"):
        quantize_datafree(model)
    calibrated = quantize_datafree(
        calibrate_bn(Scaled(), (1, 6, 6)), calibration=torch.randn(32, 1, 6, 6)
    )
    assert calibrated.ranges == "calibration"
