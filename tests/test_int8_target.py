"""Target-aware int8: the scheme chosen per CPU class, the grids every quantizer then uses, the
exported file's weight levels, onnxruntime numerics on the CPU that runs the tests, the
saturation diagnosis, and exporting for another CPU than this one.

Every CPU runs the scheme and grid checks for every named target; the onnxruntime numerics check
runs for the target of the machine running the suite (and for ``portable``, exact everywhere).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimline.compress.quant import QDQExportError, export_qdq_onnx, quantize_rtn
from slimline.compress.quant.datafree import quantize_datafree
from slimline.compress.quant.target import layer_weight_bits, module_weight_kernel
from slimline.data import load_dataset
from slimline.export import int8numerics
from slimline.export.int8check import int8_warnings, saturation_warning
from slimline.export.int8numerics import (
    explain_int8_mismatch,
    first_divergence,
    int8_weight_ranges,
    saturating_weights,
)
from slimline.export.machine import machine_info
from slimline.export.target import (
    TARGETS,
    TargetError,
    fit_weight_bits,
    resolve_target,
    target_for_machine,
)
from slimline.models import build_model

HERE = target_for_machine(machine_info())
SATURATING_HERE = HERE.saturates_u8s8
AVX2_MACHINE = {"arch": "x86_64", "cpu": "AVX2 box", "isa_flags": ["avx2"]}
VNNI_MACHINE = {"arch": "x86_64", "cpu": "VNNI box", "isa_flags": ["avx2", "avx512f", "avx512_vnni"]}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _train(model: nn.Module, data, epochs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for epoch in range(epochs):
        for x, y in data.batches("train", 64, shuffle=True, seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(digits):
    """Trained float models of the three layer kinds: residual convs, depthwise, linear."""
    torch.manual_seed(0)
    return {
        "resnet": _train(build_model("resnet", width=8), digits),
        "mobilenetv2": _train(build_model("mobilenetv2", input_size=(8, 8)), digits),
        "mlp": _train(build_model("mlp", hidden=[64, 64]), digits),
    }


# ---- scheme selection (pure data: every CPU checks every target) ---------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        (AVX2_MACHINE, "x86-avx2"),
        ({"arch": "x86_64", "isa_flags": ["avx2", "avx512f"]}, "x86-avx512"),
        (VNNI_MACHINE, "x86-vnni"),
        ({"arch": "x86_64", "isa_flags": ["avx2", "avx_vnni"]}, "x86-vnni"),
        ({"arch": "x86_64", "isa_flags": ["avx512_vnni", "amx_int8"]}, "x86-amx"),
        ({"arch": "aarch64", "isa_flags": ["asimddp"]}, "arm64-dot"),
        ({"arch": "aarch64", "isa_flags": []}, "arm64"),
        ({"arch": "x86_64", "isa_flags": []}, "portable"),  # no AVX2: assume the safe scheme
        ({"arch": "riscv64", "isa_flags": []}, "portable"),
    ],
)
def test_machine_facts_map_to_the_target_class(machine, expected):
    assert target_for_machine(machine).name == expected


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_target_limits_gemm_weights_exactly_when_its_kernels_saturate(name):
    target = resolve_target(name)
    scheme = target.scheme
    assert scheme.activation_dtype == "uint8"
    assert scheme.weight_level("depthwise") == 128  # int32 depthwise kernels: no limit
    if target.saturates_u8s8:
        # 255 * 64 * 2 = 32640 fits int16; one level more (65) would not: 33150 > 32767.
        assert scheme.weight_level("gemm") == 64 and scheme.reduce_range
        assert 255 * 64 * 2 <= 32767 < 255 * 65 * 2
        assert "VPMADDUBSW" in scheme.reason
    else:
        assert scheme.weight_level("gemm") == 128 and not scheme.reduce_range
    assert json.loads(json.dumps(target.to_dict()))["scheme"]["target"] == name


def test_auto_is_this_machine_and_unknown_names_list_the_known_ones():
    assert resolve_target("auto") == HERE == resolve_target(None)
    with pytest.raises(TargetError, match="x86-avx2.*x86-vnni.*arm64-dot"):
        resolve_target("x86-avx3")


@pytest.mark.parametrize(
    ("bits", "level", "grid", "expected"),
    [
        (8, 128, "symmetric", 8),
        (8, 128, "affine", 8),
        (8, 64, "symmetric", 7),  # +-63
        (8, 64, "affine", 7),  # [-64, 63]
        (7, 64, "odd", 6),  # StatsQ's odd levels +-63
        (6, 64, "symmetric", 6),  # low-bit weights are safe as they are
        (4, 64, "odd", 4),
    ],
)
def test_fit_weight_bits(bits, level, grid, expected):
    assert fit_weight_bits(bits, level, grid=grid) == expected


# ---- grids: the quantizers follow the target, and the file agrees --------------------------


@pytest.mark.parametrize("name", ["x86-avx2", "x86-vnni", "arm64-dot", "portable"])
@pytest.mark.parametrize("family", ["resnet", "mobilenetv2", "mlp"])
def test_rtn_grids_and_exported_levels_follow_the_target(trained, digits, tmp_path, name, family):
    target = resolve_target(name)
    model = copy.deepcopy(trained[family])
    state = quantize_rtn(model, digits.calibration(128), target=name).state
    modules = dict(model.named_modules())
    assert state.info["target"] == name
    kinds = set()
    for key, spec in state.weights.items():
        if key.endswith(".bias"):
            continue
        kernel = module_weight_kernel(modules[key.removesuffix(".weight")])
        kinds.add(kernel)
        assert spec.qmax <= target.scheme.weight_level(kernel)
        expected_bits = 7 if (target.saturates_u8s8 and kernel == "gemm") else 8
        assert spec.bits == expected_bits, key
    if family == "mobilenetv2":
        assert kinds == {"gemm", "depthwise"}
    lowered = state.info["weight_bits_lowered"]
    assert bool(lowered) == target.saturates_u8s8
    path = export_qdq_onnx(model, digits.x_test[:2], tmp_path / "m.onnx", target=name)[0]
    ranges = int8_weight_ranges(path)
    assert len(ranges) == sum(not k.endswith(".bias") for k in state.weights)
    assert saturating_weights(ranges, target) == []
    # The ONNX-side kernel rule agrees with the PyTorch-side one, layer by layer.
    onnx_kinds = {r.weight.removesuffix("_quantized"): r.kernel for r in ranges}
    for key in onnx_kinds:
        assert onnx_kinds[key] == module_weight_kernel(modules[key.removesuffix(".weight")])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["slimline.int8_target"] == name
    assert json.loads(meta["slimline.int8_scheme"])["reduce_range"] == target.saturates_u8s8


def test_datafree_asymmetric_and_low_bit_grids_fit_the_target(trained):
    conv = trained["resnet"].conv1
    assert layer_weight_bits(conv, 8, "x86-avx2", grid="affine") == 7
    assert layer_weight_bits(conv, 6, "x86-avx2") == 6
    model = copy.deepcopy(trained["resnet"])
    state = quantize_datafree(model, weight_bits=8, symmetric_weights=False, target="x86-avx2").state
    for key, spec in state.weights.items():
        if not key.endswith(".bias"):
            assert -spec.qmin <= 64 and spec.qmax <= 64, key


# ---- numerics on the CPU running the suite --------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "portable"])
@pytest.mark.parametrize("family", ["resnet", "mobilenetv2", "mlp"])
def test_fused_int8_kernels_here_match_the_qdq_graph(trained, digits, tmp_path, name, family):
    """What the issue was about: on this CPU, a file quantized for it is computed exactly."""
    model = copy.deepcopy(trained[family])
    quantize_rtn(model, digits.calibration(256), target=name)
    path = export_qdq_onnx(model, digits.x_test[:2], tmp_path / "m.onnx", target=name)[0]
    feed = {onnx.load(str(path)).graph.input[0].name: digits.x_test[:128].numpy()}
    assert first_divergence(path, feed) is None
    assert saturation_warning(path, machine_info()) is None


@pytest.mark.skipif(not SATURATING_HERE, reason=f"this CPU ({HERE.name}) does not saturate u8s8")
def test_full_range_weights_saturate_here_and_the_error_names_node_and_fix(trained, digits,
                                                                          tmp_path):
    model = copy.deepcopy(trained["resnet"])
    quantize_rtn(model, digits.calibration(256), target="x86-vnni")
    path = export_qdq_onnx(model, digits.x_test[:2], tmp_path / "vnni.onnx", target="x86-vnni")[0]
    feed = {onnx.load(str(path)).graph.input[0].name: digits.x_test[:128].numpy()}
    divergence = first_divergence(path, feed)
    assert divergence is not None and divergence.max_levels > 10
    assert divergence.layer.endswith(".weight")
    text = explain_int8_mismatch(path, feed, machine=machine_info())
    assert "u8s8 saturation" in text and f"target: {HERE.name}" in text
    assert "reduce_range=True" in text
    warning = saturation_warning(path, machine_info())
    assert warning is not None and "exported for x86-vnni" in warning and "WRONG" in warning


_REAL_SESSION = int8numerics._session


def _perturbed_divergence(trained, digits, tmp_path, monkeypatch, *, every: int,
                          levels: int = 20):
    """first_divergence when the fused session is made ``levels`` off at points[3], in every
    ``every``-th value of that tensor (1: all of them)."""
    model = copy.deepcopy(trained["resnet"])
    quantize_rtn(model, digits.calibration(128), target="portable")
    path = export_qdq_onnx(model, digits.x_test[:2], tmp_path / "m.onnx", target="portable")[0]
    graph = onnx.load(str(path)).graph
    const = {t.name for t in graph.initializer}
    points = [n.output[0] for n in graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] not in const]
    chosen = points[3]
    real_session = _REAL_SESSION  # not int8numerics._session: an earlier call may have patched it

    class Perturbed:
        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            outputs = self.session.run(names, feed)
            shifted = {}
            for n, o in zip(names, outputs):
                if n == chosen:  # off by `levels`, without uint8 wrap-around
                    moved = np.where(o > 127, o - levels, o + levels).astype(o.dtype).reshape(-1)
                    keep = o.reshape(-1).copy()
                    keep[::every] = moved[::every]
                    shifted[n] = keep.reshape(o.shape)
            return [shifted.get(n, o) for n, o in zip(names, outputs)]

    def session(model_proto, optimize):
        made = real_session(model_proto, optimize)
        return Perturbed(made) if optimize else made

    monkeypatch.setattr(int8numerics, "_session", session)
    feed = {graph.input[0].name: digits.x_test[:16].numpy()}
    return first_divergence(path, feed), chosen


def test_first_divergence_names_the_first_tensor_that_differs(trained, digits, tmp_path,
                                                              monkeypatch):
    """Localisation on any CPU: the fused session is made to differ at one chosen tensor."""
    divergence, chosen = _perturbed_divergence(trained, digits, tmp_path, monkeypatch, every=1)
    assert divergence is not None and divergence.tensor == chosen
    assert divergence.checked == 4 and divergence.max_levels == 20


def test_a_few_values_off_are_propagated_rounding_not_a_divergence(trained, digits, tmp_path,
                                                                   monkeypatch):
    """Deep layers sum their inputs' one-level roundings into a few values 4-5 levels off; that
    is not a kernel computing something else (a sizeable share of the tensor is), while even a
    few values tens of levels off are saturation."""
    divergence, _ = _perturbed_divergence(trained, digits, tmp_path, monkeypatch, every=5000,
                                          levels=5)
    assert divergence is None
    divergence, chosen = _perturbed_divergence(trained, digits, tmp_path, monkeypatch,
                                               every=100, levels=5)
    assert divergence is not None and divergence.tensor == chosen
    assert divergence.fraction_off == pytest.approx(0.01, rel=0.05)
    divergence, chosen = _perturbed_divergence(trained, digits, tmp_path, monkeypatch,
                                               every=5000, levels=20)
    assert divergence is not None and divergence.tensor == chosen
    assert divergence.max_levels == 20


# ---- exporting for another CPU -------------------------------------------------------------


def test_export_refuses_weights_the_target_would_saturate(trained, digits, tmp_path):
    model = copy.deepcopy(trained["mlp"])
    quantize_rtn(model, digits.calibration(128), target="x86-vnni")
    path = tmp_path / "m.onnx"
    with pytest.raises(QDQExportError, match="x86-avx2.*quantized for x86-vnni.*No file"):
        export_qdq_onnx(model, digits.x_test[:2], path, target="x86-avx2")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_int8_warnings_name_the_fix_for_a_file_made_for_another_cpu(trained, digits, tmp_path):
    model = copy.deepcopy(trained["mlp"])
    quantize_rtn(model, digits.calibration(128), target="x86-vnni")
    path = export_qdq_onnx(model, digits.x_test[:2], tmp_path / "vnni.onnx")[0]  # state's target
    on_avx2 = " ".join(int8_warnings(path, machine=AVX2_MACHINE))
    assert "WRONG" in on_avx2 and "`target: x86-avx2`" in on_avx2 and "x86-vnni" in on_avx2
    assert saturation_warning(path, VNNI_MACHINE) is None
    safe = copy.deepcopy(trained["mlp"])
    quantize_rtn(safe, digits.calibration(128), target="x86-avx2")
    safe_path = export_qdq_onnx(safe, digits.x_test[:2], tmp_path / "avx2.onnx")[0]
    messages = int8_warnings(safe_path, machine=AVX2_MACHINE)
    assert not any("WRONG" in m for m in messages)
    assert any("within that range" in m for m in messages)  # the speed warning stays


@pytest.mark.parametrize(("quantizer", "bits", "limit_bits"), [("lsq", 8, 7), ("statsq", 7, 6)])
@pytest.mark.parametrize("name", ["x86-avx2", "x86-vnni"])
def test_qat_trains_and_exports_on_the_target_grid(quantizer, bits, limit_bits, name):
    from slimline.compress.quant.qat import QATConfig, QATController

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    controller = QATController(model, QATConfig(weight_quantizer=quantizer, weight_bits=bits,
                                                activation_bits=8, skip=None), target=name)
    controller.install(torch.randn(32, 8))
    expected = limit_bits if resolve_target(name).saturates_u8s8 else bits
    assert {q.bits for m in controller.layers.values()
            for q in [m.parametrizations.weight[0]]} == {expected}
    state = controller.finish()
    assert state.info["target"] == name and state.info["weight_bits_used"] == [expected]
    level = resolve_target(name).scheme.weight_level("gemm")
    for spec in state.weights.values():
        assert max(-spec.qmin, spec.qmax) <= level
        assert spec.on_grid(dict(model.named_parameters())[
            next(k for k in state.weights if state.weights[k] is spec)])
