"""Quantization state: grids by definition, exact serialisation, attachment that survives
deepcopy and Artifact save/load, BatchNorm folding, RTN calibration and placement."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from slimline.artifact import Artifact
from slimline.compress.quant import (
    QuantSpec,
    QuantState,
    QuantStateError,
    TensorPoint,
    affine_spec,
    attach_quantization,
    detach_quantization,
    fold_batchnorm,
    fold_conv_bn_weights,
    off_grid_parameters,
    quantization_of,
    quantize_rtn,
    symmetric_spec,
)
from slimline.models import build_model
from slimline.structure import structure_diff


def _spec(scale, zero_point=0, bits=8, signed=True, axis=None, narrow=False) -> QuantSpec:
    return QuantSpec(
        bits=bits,
        signed=signed,
        axis=axis,
        narrow=narrow,
        scale=torch.tensor(scale),
        zero_point=torch.tensor(zero_point),
    )


@pytest.mark.parametrize(
    ("bits", "signed", "narrow", "qmin", "qmax"),
    [
        (8, True, True, -127, 127),
        (8, True, False, -128, 127),
        (8, False, False, 0, 255),
        (4, True, True, -7, 7),
        (4, True, False, -8, 7),
        (2, True, True, -1, 1),
    ],
)
def test_grid_limits(bits, signed, narrow, qmin, qmax) -> None:
    spec = _spec(1.0, bits=bits, signed=signed, narrow=narrow)
    assert (spec.qmin, spec.qmax, spec.levels) == (qmin, qmax, qmax - qmin + 1)


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    spec = _spec(0.5, narrow=True)
    x = torch.tensor([0.24, 0.25, 0.75, 1.25, -0.25, -100.0, 100.0])
    assert spec.quantize(x).tolist() == [0, 0, 2, 2, 0, -127, 127]
    assert torch.equal(spec.fake_quant(x), spec.quantize(x).float() * 0.5)
    unsigned = _spec(0.1, zero_point=10, signed=False)
    q = unsigned.quantize(torch.tensor([-1.0, -2.0, 0.0, 30.0]))
    assert q.tolist() == [0, 0, 10, 255]  # -1.0 -> -10 + 10 = 0; -2.0 saturates at 0
    assert torch.equal(unsigned.dequantize(q), (q.float() - 10) * torch.tensor(0.1))


def test_per_channel_scales_apply_along_the_axis() -> None:
    spec = _spec([1.0, 0.5, 0.25], axis=0, narrow=True)
    x = torch.ones(3, 2)
    assert spec.quantize(x).tolist() == [[1, 1], [2, 2], [4, 4]]
    columns = QuantSpec(bits=8, signed=True, axis=1, scale=torch.tensor([1.0, 0.5]), zero_point=0)
    assert columns.quantize(torch.ones(3, 2)).tolist() == [[1, 2]] * 3


def test_symmetric_and_affine_grids_by_definition() -> None:
    spec = symmetric_spec(torch.tensor([2.54, 0.0]), 8, axis=0)
    assert torch.equal(spec.scale, torch.tensor([2.54 / 127, 1.0]))
    assert spec.zero_point.tolist() == [0, 0]
    affine = affine_spec(-1.0, 3.0, 8)  # uint8: scale 4/255, zero point round(255/4) = 64
    assert float(affine.scale) == pytest.approx(4 / 255) and int(affine.zero_point) == 64
    assert float(affine.fake_quant(torch.tensor(0.0))) == 0.0  # zero exactly representable
    relu = affine_spec(0.5, 5.0, 8)  # range widened to include 0: zero point at the minimum
    assert int(relu.zero_point) == relu.qmin == 0
    signed = affine_spec(-3.0, 3.0, 8, signed=True, symmetric=True)
    assert int(signed.zero_point) == 0 and float(signed.scale) == pytest.approx(6 / 255)


def test_fake_quant_straight_through_gradient() -> None:
    x = torch.tensor([0.3, 1.0, 500.0], requires_grad=True)
    _spec(0.5, narrow=True).fake_quant(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped outside the grid


def test_serialisation_round_trips_float32_scales_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    scales = torch.rand(17, generator=generator) * 1e-3 + 1e-9  # full-precision float32 bits
    spec = QuantSpec(bits=4, signed=True, narrow=True, axis=0, scale=scales, zero_point=0)
    state = QuantState(
        weights={"fc.weight": spec},
        activations={"fc:input": affine_spec(-0.123456789, 7.654321, 8)},
        method="rtn",
        info={"weight_bits": 4},
    )
    loaded = QuantState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert torch.equal(loaded.weights["fc.weight"].scale, scales)  # bit for bit
    assert loaded.weights["fc.weight"] == spec and loaded.activations == state.activations
    assert loaded.method == "rtn" and loaded.info == {"weight_bits": 4}
    with pytest.raises(QuantStateError, match="version"):
        QuantState.from_dict({**state.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="unknown"):
        QuantSpec.from_dict({**spec.to_dict(), "code": "import os"})


def test_tensor_point_keys() -> None:
    assert TensorPoint.parse("layer1.0.relu1:output") == TensorPoint("layer1.0.relu1", "output")
    assert TensorPoint("fc", "input").key == "fc:input"
    with pytest.raises(ValueError, match="input\\|output"):
        TensorPoint.parse("fc")


def _trained_like_resnet(seed: int = 0) -> nn.Module:
    """A ResNet whose BatchNorms have non-trivial statistics (what training leaves behind)."""
    torch.manual_seed(seed)
    model = build_model("resnet", width=4)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def test_fold_batchnorm_keeps_float_outputs_and_records_structure() -> None:
    model = _trained_like_resnet()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 1, 8, 8)
    folded = fold_batchnorm(model)
    assert len(folded) == 9 and ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in folded
    assert isinstance(model.layer1[0].bn1, nn.Identity) and model.conv1.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    diff = structure_diff(build_model("resnet", width=4), model)
    assert diff["layer1.0.bn1"] == {"replace": "Identity"}
    assert diff["conv1"] == {"tensors": {"bias": [4]}}


def test_fold_conv_bn_weights_by_definition() -> None:
    weight, bias = torch.ones(2, 1, 1, 1), torch.tensor([1.0, 0.0])
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 1.0])
    gamma, beta = torch.tensor([2.0, 1.0]), torch.tensor([0.5, -1.0])
    w, b = fold_conv_bn_weights(weight, bias, mean, var, gamma, beta, eps=0.0)
    assert w.flatten().tolist() == [1.0, 1.0]  # gamma / sqrt(var) = [1, 1]
    assert b.tolist() == [0.5, -3.0]  # (b - mean) * s + beta


@pytest.fixture(scope="module")
def quantized_mlp() -> tuple[nn.Module, QuantState, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[32, 16]).eval()
    calibration = torch.randn(64, 1, 8, 8)
    result = quantize_rtn(model, calibration, weight_bits=8)
    return model, result.state, calibration


def test_rtn_state_placement_and_bias_grid(quantized_mlp) -> None:
    model, state, _ = quantized_mlp
    assert set(state.activations) == {
        "features.0:output",
        "features.2:output",
        "features.4:output",
    }  # flatten and both ReLU outputs
    assert state.weights["head.weight"].per_channel and state.weights["head.bias"].bits == 32
    expected = state.activations["features.4:output"].scale * state.weights["head.weight"].scale
    assert torch.equal(state.weights["head.bias"].scale, expected)
    assert off_grid_parameters(model, state) == []
    assert quantization_of(model) is state


def test_attachment_survives_deepcopy_and_runs_fake_quant(quantized_mlp) -> None:
    model, state, calibration = quantized_mlp
    x = calibration[:16]
    with torch.no_grad():
        quantized = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), quantized)
        assert quantization_of(twin) is not None and quantization_of(twin) is not state
        detach_quantization(twin)  # weights stay baked, activations float again
        assert not torch.equal(twin(x), quantized)
        assert torch.equal(model(x), quantized)  # the original kept its hooks
        hidden = model.features[:3](x)  # output of the first ReLU: on its uint8 grid
        spec = state.activations["features.2:output"]
        assert torch.equal(spec.fake_quant(hidden), hidden)


def test_artifact_save_load_reinstalls_fake_quant(quantized_mlp, tmp_path: Path) -> None:
    model, state, calibration = quantized_mlp
    artifact = Artifact(
        model=model,
        model_spec={"name": "mlp", "with": {"hidden": [32, 16]}},
        input_shape=(1, 8, 8),
        state={"quantization": state.to_dict()},
    )
    artifact.save(tmp_path)
    loaded = Artifact.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.model(calibration), model(calibration))
    assert quantization_of(loaded.model).activations == state.activations


def test_artifact_reload_of_bn_folded_resnet(tmp_path: Path) -> None:
    """Folding gives bias-less convs a bias and turns BNs into Identity: both must replay."""
    model = _trained_like_resnet()
    state = quantize_rtn(model, torch.randn(32, 1, 8, 8)).state
    artifact = Artifact(
        model=model,
        model_spec={"name": "resnet", "with": {"width": 4}},
        input_shape=(1, 8, 8),
        state={"quantization": state.to_dict()},
    )
    artifact.save(tmp_path)
    loaded = Artifact.load(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_attach_names_what_does_not_fit(quantized_mlp) -> None:
    _, state, _ = quantized_mlp
    other = build_model("mlp", hidden=[8])
    with pytest.raises(QuantStateError, match="features.1.weight: 32 scales for 8 channels"):
        attach_quantization(other, state)
    model = copy.deepcopy(quantized_mlp[0])
    with torch.no_grad():
        model.head.weight.add_(1e-3)
    assert off_grid_parameters(model, state) == ["head.weight"]
