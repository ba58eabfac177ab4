"""SmoothQuant activation smoothing in quant.rtn (compress/quant/smoothing.py): eq. 4 by hand,
the float identity it relies on, the paper's claim at small scale (outlier channels in a Linear's
input: smoothing lowers the int8 error), shared divisors for layers reading one tensor, the state
round trip, and the int8 ONNX file computing what the PyTorch model computes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import slimline
from slimline.compress.quant import attach_quantization, detach_quantization, quantization_of
from slimline.compress.quant.rtn import RTNConfig, quantize_rtn
from slimline.compress.quant.smoothing import smoothquant_scales
from slimline.compress.quant.state import QuantState
from slimline.params import ParamError


class OutlierBlock(nn.Module):
    """LayerNorm-like features with three outlier channels (x30, as BERT's), read by three
    projections (an attention block's q/k/v) and an MLP behind them."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        gain = torch.ones(width)
        gain[[3, 11, 20]] = 30.0
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.gain
        mixed = self.q(h) + self.k(h) * self.v(h).sigmoid()
        return self.down(torch.nn.functional.gelu(self.up(mixed)))


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 8, 32, generator=torch.Generator().manual_seed(seed))


def _relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).pow(2).mean() / reference(x).pow(2).mean())


def test_smoothquant_scales_by_hand():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 1.0])
    # s_j = a_j^alpha / w_j^(1 - alpha); a channel that is always zero keeps s = 1
    assert torch.allclose(smoothquant_scales(a, w, 0.5), torch.tensor([2.0, 0.5, 1.0, 3.0]))
    assert torch.allclose(smoothquant_scales(a, w, 1.0), torch.tensor([4.0, 1.0, 1.0, 9.0]))
    assert torch.allclose(smoothquant_scales(a, w, 0.0), torch.tensor([1.0, 0.25, 1.0, 1.0]))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(a, w, 1.5)


@pytest.mark.parametrize("target", ["x86-vnni", "x86-avx2"])  # 8-bit and 7-bit weight grids
def test_smoothing_moves_outliers_into_the_weights_and_lowers_int8_error(target):
    torch.manual_seed(0)
    reference = OutlierBlock().eval()
    calibration, held_out = _inputs(64, 1), _inputs(64, 2)
    errors, results = {}, {}
    for smoothing in (None, 0.5, "auto"):
        model = copy.deepcopy(reference)
        results[smoothing] = quantize_rtn(model, calibration, smoothing=smoothing, target=target)
        errors[smoothing] = _relative_error(model, reference, held_out)
    # The paper's claim at small scale: W8A8 error falls when activation outliers move into
    # the per-channel weights. Auto (per layer, "none" a candidate) is at least as good here.
    assert errors[0.5] < 0.5 * errors[None], errors
    assert errors["auto"] < 0.5 * errors[None], errors
    smoothed = results["auto"].state.smoothing
    assert set(smoothed) >= {"q:input", "k:input", "v:input"}
    # q, k and v read one tensor: one divisor for all three, so the file quantizes it once
    assert torch.equal(smoothed["q:input"], smoothed["k:input"])
    assert torch.equal(smoothed["q:input"], smoothed["v:input"])
    # the outlier channels are the ones divided most
    assert set(smoothed["q:input"].topk(3).indices.tolist()) == {3, 11, 20}
    assert results["auto"].state.info["smoothed_layers"] == len(smoothed)


def test_smoothed_model_is_the_float_model_before_quantization():
    """Eq. 3: (X diag(s)^-1)(diag(s) W) = XW. With 16-bit grids, the smoothed and the plain
    quantized models both sit within rounding of the float one."""
    torch.manual_seed(0)
    reference = OutlierBlock().eval()
    model = copy.deepcopy(reference)
    result = quantize_rtn(model, _inputs(16, 1), smoothing=0.5)
    weights_only = copy.deepcopy(model)
    state = QuantState(weights={}, smoothing=result.state.smoothing)  # division, no grids
    attach_quantization(weights_only, state)
    x = _inputs(8, 3)
    with torch.no_grad():
        # the weights hold diag(s)-scaled int8 values: dividing the inputs undoes the scaling
        # up to the weights' own int8 rounding (1e-3 relative), never the x30 of the outliers
        assert _relative_error(weights_only, reference, x) < 1e-3


def test_state_round_trip_reattach_and_detach():
    torch.manual_seed(0)
    reference = OutlierBlock().eval()
    model = copy.deepcopy(reference)
    quantize_rtn(model, _inputs(32, 1), smoothing="auto")
    state = quantization_of(model)
    restored = QuantState.from_dict(state.to_dict())
    assert restored.smoothing.keys() == state.smoothing.keys()
    assert all(torch.equal(restored.smoothing[k], state.smoothing[k]) for k in state.smoothing)
    copy_ = copy.deepcopy(model)
    attach_quantization(copy_, restored)  # re-attaching must not scale the weights twice
    x = _inputs(4, 5)
    with torch.no_grad():
        assert torch.equal(copy_(x), model(x))
    detach_quantization(copy_)  # weights back to W (int8-rounded): the float model again
    assert _relative_error(copy_, reference, x) < 1e-3
    attach_quantization(copy_, restored, scale_weights=True)  # and back onto W diag(s)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), model(x), rtol=0, atol=1e-6)


class _InPlaceResidual(nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        self.fc, self.in_place = nn.Linear(16, 16), in_place
        gain = torch.ones(16)
        gain[5] = 20.0
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.gain
        if self.in_place:
            h += self.fc(h)  # rewrites the tensor fc read, after it read it
            return h
        return h + self.fc(h)


def test_statistics_are_what_the_layer_read_not_what_in_place_ops_left():
    torch.manual_seed(0)
    x = torch.randn(64, 4, 16)
    divisors = {}
    for in_place in (False, True):
        torch.manual_seed(1)
        model = _InPlaceResidual(in_place).eval()
        divisors[in_place] = quantize_rtn(model, x, smoothing=0.5).state.smoothing["fc:input"]
    torch.testing.assert_close(divisors[True], divisors[False])


def test_auto_needs_enough_calibration_rows_and_skips_already_quantized_inputs():
    torch.manual_seed(0)
    few = quantize_rtn(OutlierBlock().eval(), _inputs(1, 1)[:, :4], smoothing="auto")
    assert few.state.smoothing == {}  # 4 rows cannot tell an alpha from noise
    # Linear -> ReLU -> Linear, traced: the ReLU output is quantized for the first layer's
    # fused kernel anyway; smoothing the second would round that tensor twice
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    result = quantize_rtn(mlp, torch.randn(64, 8), smoothing=0.5)
    assert set(result.state.smoothing) == {"0:input"}
    assert "1:output" in result.state.activations


def test_refuses_what_does_not_fit():
    model = OutlierBlock().eval()
    with pytest.raises(ValueError, match="input"):
        QuantState(smoothing={"q:output": torch.ones(32)})
    with pytest.raises(ValueError, match="32 input features"):
        attach_quantization(model, QuantState(smoothing={"q:input": torch.ones(5)}))
    with pytest.raises(ValueError, match="no Linear"):
        attach_quantization(model, QuantState(smoothing={":input": torch.ones(32)}))
    with pytest.raises(ParamError, match="smoothing"):
        RTNConfig(smoothing=1.5)
    with pytest.raises(ParamError, match="smoothing"):
        RTNConfig(smoothing=2)  # an int, as Python callers write it
    assert RTNConfig(smoothing=1).smoothing == 1
    with pytest.raises(ParamError, match="smoothing"):
        slimline.params.parse_params(RTNConfig, {"smoothing": "on"})


def test_int8_file_runs_the_smoothing_and_matches_pytorch(tmp_path: Path):
    ort = pytest.importorskip("onnxruntime")
    from slimline.compress.deploy import ExportConfig

    torch.manual_seed(0)
    reference = OutlierBlock().eval()
    model = copy.deepcopy(reference)
    quantize_rtn(model, _inputs(64, 1), smoothing="auto")
    x = _inputs(16, 4)
    exported = slimline.export_model(model, x[:1], tmp_path / "int8.onnx",
                                     ExportConfig(format="int8"), parity_inputs=x)
    graph = onnx.load(str(exported.path)).graph
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    smoothing_muls = [n for n in graph.node if n.op_type == "Mul" and any(
        i in constants and constants[i].shape == (32,) for i in n.input)]
    assert smoothing_muls, "the division by s is a Mul in front of the input QuantizeLinear"
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(out - expected).max() < 1e-3 * abs(expected).max()


class NormBlock(nn.Module):
    """LayerNorm -> q/k/v (pre-LN, as ViT/GPT-2), or post-LN with the residual reading it too."""

    def __init__(self, residual: bool, width: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.residual = residual
        with torch.no_grad():
            self.norm.weight[[3, 11, 20]] = 30.0  # outlier channels, as BERT's
            self.norm.bias.normal_()  # a fold must scale the bias too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        out = self.q(h) + self.k(h) * self.v(h).sigmoid()
        return out + h if self.residual else out


@pytest.mark.parametrize("residual", [False, True], ids=["pre-ln", "post-ln"])
def test_divisor_of_a_layernorm_read_by_the_linears_alone_is_folded_into_it(residual, tmp_path):
    pytest.importorskip("onnxruntime")
    from slimline.compress.deploy import ExportConfig

    torch.manual_seed(0)
    model = NormBlock(residual).eval()
    quantize_rtn(model, _inputs(64, 1), smoothing=0.5)
    x = _inputs(16, 4)
    exported = slimline.export_model(model, x[:1], tmp_path / "int8.onnx",
                                     ExportConfig(format="int8"), parity_inputs=x)
    graph = onnx.load(str(exported.path)).graph
    norm = next(n for n in graph.node if n.op_type == "LayerNormalization")
    readers = [n.op_type for n in graph.node if norm.output[0] in n.input]
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    if residual:  # the residual needs the unscaled output: the divisor stays a Mul
        assert sorted(readers) == ["Add", "Mul"]
    else:  # LN(x; g, b) / s = LN(x; g / s, b / s): the QuantizeLinear reads the LayerNorm
        assert readers == ["QuantizeLinear"]
        assert constants[norm.input[1]][3] < 30.0 and norm.input[1].endswith("_smoothed")
    assert exported.metrics["max_rel_diff"] < 0.02  # parity with PyTorch, checked by the export


def _norm_times(factor: np.ndarray, *, in_branch: bool = False) -> onnx.ModelProto:
    """x (2, 4) -> LayerNormalization -> Mul(factor) -> y, optionally read inside an If too."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([1.0, 2.0, 3.0, 4.0], np.float32), "g"),
             numpy_helper.from_array(np.array([0.5, -1.0, 0.0, 2.0], np.float32), "b"),
             numpy_helper.from_array(factor.astype(np.float32), "c")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             helper.make_node("Mul", ["n", "c"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if in_branch:
        body = helper.make_graph([helper.make_node("Identity", ["n"], ["inner"])], "body", [],
                                 [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
        inits.append(numpy_helper.from_array(np.array(True), "flag"))
        nodes.append(helper.make_node("If", ["flag"], ["branch"], then_branch=body,
                                      else_branch=body))
        outputs.append(helper.make_tensor_value_info("branch", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 4])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("factor, in_branch, folds", [
    (np.array([0.5, -2.0, 0.0, 3.0]), False, True),  # per channel: folded, exactly
    (np.array(4.0), False, True),  # one value
    (np.ones((1, 1, 4)), False, False),  # broadcasts (2, 4) to (1, 2, 4): a shape, not a scale
    (np.array([0.5, -2.0, 0.0, 3.0]), True, False),  # an If reads the LayerNorm's output
], ids=["per-channel", "scalar", "higher-rank", "read-in-subgraph"])
def test_layernorm_fold_keeps_every_value_and_shape(factor, in_branch, folds):
    ort = pytest.importorskip("onnxruntime")
    from slimline.export.graph_rewrites import fold_scale_into_layernorm

    model = _norm_times(factor, in_branch=in_branch)
    x = {"x": np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)}

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        return ort.InferenceSession(m.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, x)

    before = run(model)
    assert fold_scale_into_layernorm(model) == int(folds)
    after = run(model)
    assert [a.shape for a in after] == [b.shape for b in before]
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (not any(n.op_type == "Mul" for n in model.graph.node)) == folds


def test_recipe_option_reaches_the_quantizer():
    torch.manual_seed(0)
    model = OutlierBlock().eval()
    from slimline.data import Dataset

    x = _inputs(64, 1)
    y = torch.zeros(64, dtype=torch.long)
    data = Dataset("outliers", x, y, x[:8], y[:8], x[:8], y[:8], 1, task="embedding")
    result = slimline.quantize(model, RTNConfig(calibration_samples=64, smoothing="auto"),
                               data=data)
    assert result.metrics["smoothed_layers"] >= 3
    assert quantization_of(model).info["smoothing"] == "auto"
    # smoothing_layers limits which Linears it may touch (fewer Muls in the file)
    model = OutlierBlock().eval()
    slimline.quantize(model, RTNConfig(calibration_samples=64, smoothing=0.5,
                                       smoothing_layers="^(q|k|v)$"), data=data)
    assert set(quantization_of(model).smoothing) == {"q:input", "k:input", "v:input"}
    with pytest.raises(ParamError, match="smoothing_layers"):
        RTNConfig(smoothing_layers="(")
