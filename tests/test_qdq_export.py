"""int8 QDQ export: graph content, exact scales, onnxruntime integer kernels, parity with the
PyTorch fake-quant model, low-bit weights, pruned zeros, and the export stage's failures."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from onnx import numpy_helper

import slimline
from slimline.compress.prune import magnitude
from slimline.compress.quant import QDQExportError, export_qdq_onnx, quantize_rtn
from slimline.compress.quant.qdq_export import scale_mismatches
from slimline.data import load_dataset
from slimline.export import check_parity
from slimline.export.qdq_inspect import (
    FLOAT_KERNEL_OPS,
    INT8_KERNEL_OPS,
    ort_optimized_op_counts,
    qdq_summary,
)
from slimline.models import build_model
from slimline.stage import StageFailed

RECIPE = Path(__file__).parent.parent / "recipes" / "int8_deploy.yaml"


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


def _export(model: nn.Module, path: Path) -> Path:
    return export_qdq_onnx(model, torch.randn(2, 1, 8, 8), path)[0]


@pytest.fixture(scope="module")
def resnet_int8(digits, tmp_path_factory):
    torch.manual_seed(0)
    model = _train(build_model("resnet", width=8), digits)
    float_model = copy.deepcopy(model)
    state = quantize_rtn(model, digits.calibration(256)).state
    path = _export(model, tmp_path_factory.mktemp("resnet") / "resnet_int8.onnx")
    return float_model, model, state, path


def test_resnet_graph_has_qdq_pairs_int8_weights_and_exact_scales(resnet_int8) -> None:
    _, model, state, path = resnet_int8
    summary = qdq_summary(path)
    assert summary.quantize_nodes == len(state.activations) == 13
    weights = [name for name in state.weights if name.endswith(".weight")]
    assert sorted(summary.weights) == sorted(f"{name}_quantized" for name in weights)
    assert all(w["dtype"] == "int8" for w in summary.weights.values())
    assert summary.int32_biases == len(weights) and summary.float_weights == []
    # DQ count: one per activation pair, per int8 weight, per int32 bias.
    assert summary.dequantize_nodes == 13 + 2 * len(weights)
    assert scale_mismatches(summary, state) == []  # bit-identical to the PyTorch specs
    graph = onnx.load(str(path)).graph
    float_inits = [
        t.name
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2
    ]
    assert float_inits == []  # no float copy of any weight left in the file


def test_resnet_runs_integer_kernels_in_onnxruntime(resnet_int8) -> None:
    ops = ort_optimized_op_counts(resnet_int8[3])
    convs = ops.get("QLinearConv", 0) + ops.get("com.microsoft.QLinearConv", 0)
    assert convs == 9  # every conv, the projection shortcuts included
    assert ops.get("com.microsoft.QLinearAdd") == 2 and ops.get("com.microsoft.QGemm") == 1
    assert not set(ops) & FLOAT_KERNEL_OPS


def test_resnet_int8_matches_pytorch_fake_quant(resnet_int8, digits) -> None:
    float_model, model, _, path = resnet_int8
    x, y = digits.split("test")
    parity = check_parity(model, path, x)
    assert parity.top1_agreement >= 0.98
    assert parity.max_rel_diff <= 0.02  # requantization rounds differently from float
    with torch.no_grad():
        fp32 = float(((float_model(x).argmax(1)) == y).float().mean())
        int8 = float(((model(x).argmax(1)) == y).float().mean())
    assert int8 >= fp32 - 0.02


def test_pruned_4bit_weights_keep_zeros_use_16_levels_and_skip_stays_float(
    digits, tmp_path
) -> None:
    model = _train(build_model("mlp", hidden=[32, 32]), digits, epochs=1)
    magnitude(model, sparsity=0.6)
    masks = {name: m.weight == 0 for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = quantize_rtn(model, digits.calibration(128), weight_bits=4, skip="^head$").state
    assert "head.weight" not in state.weights
    path = _export(model, tmp_path / "mlp_w4.onnx")
    summary = qdq_summary(path)
    assert scale_mismatches(summary, state) == []
    assert len(summary.weights) == 2 and summary.float_weights == ["head.weight"]
    for weight in summary.weights.values():
        assert weight["dtype"] == "int8" and weight["levels"] <= 16
        assert weight["min"] >= -8 and weight["max"] <= 7
        assert np.asarray(weight["zero_point"]).max() == 0
    # Pruned weights are exactly 0 in the int8 file (rounding may add zeros, never remove one).
    initializers = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
    }
    for name in ("features.1", "features.3"):
        pruned = masks[name].numpy()
        assert pruned.mean() > 0.3 and (initializers[f"{name}.weight_quantized"][pruned] == 0).all()
    ops = ort_optimized_op_counts(path)
    assert ops.get("com.microsoft.QGemm") == 2 and ops.get("Gemm") == 1
    parity = check_parity(model, path, digits.split("test")[0])
    assert parity.top1_agreement >= 0.98 and parity.max_rel_diff <= 0.02


def test_vit_linear_layers_run_as_integer_matmuls(digits, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("vit", dim=16, depth=1, heads=2).eval()
    state = quantize_rtn(model, digits.calibration(64)).state
    path = _export(model, tmp_path / "vit.onnx")
    summary = qdq_summary(path)
    assert scale_mismatches(summary, state) == []
    assert {
        "blocks.0.attn.q.weight_quantized",
        "blocks.0.attn.k.weight_quantized",
        "blocks.0.attn.v.weight_quantized",
    } <= set(summary.weights)
    ops = ort_optimized_op_counts(path)
    assert ops.get("com.microsoft.MatMulIntegerToFloat") == 6  # q, k, v, proj, fc1, fc2
    assert sum(v for k, v in ops.items() if k in INT8_KERNEL_OPS) == 8  # + patch conv + head
    parity = check_parity(model, path, digits.split("test")[0][:64])
    assert parity.top1_agreement >= 0.98 and parity.max_rel_diff <= 0.02


def test_int8_export_stage_reports_sparsity_and_refuses_float_models(tmp_path, tiny_recipe) -> None:
    path = tmp_path / "float.onnx"
    with pytest.raises(QDQExportError, match="no quantization state"):
        export_qdq_onnx(build_model("mlp"), torch.randn(2, 1, 8, 8), path)
    assert not path.exists()
    tiny_recipe["stages"] += [  # train -> prune -> eval, then:
        {"id": "quant", "uses": "quant.rtn", "needs": ["prune"], "with": {"weight_bits": 6}},
        {"id": "export", "uses": "export.onnx", "with": {"format": "int8"}},
    ]
    result = slimline.run(tiny_recipe, run_dir=tmp_path / "run", progress=False)
    export = result.record("export").metrics
    assert export["onnx_sparsity"] >= result.record("prune").metrics["sparsity"] >= 0.49
    assert export["weight_bits"] == 6 and "6-bit" in export["note"]
    assert export["top1_agreement"] >= 0.98 and export["int8_weights"] == 2
    tiny_recipe["stages"].append(
        {
            "id": "export_float",
            "uses": "export.onnx",
            "needs": ["prune"],
            "with": {"format": "int8"},
        }
    )
    with pytest.raises(StageFailed, match="no quantization state.*No file was written"):
        slimline.run(tiny_recipe, run_dir=tmp_path / "run", progress=False)
    assert not list((tmp_path / "run" / "stages").glob("export_float*"))


def test_int8_deploy_recipe_runs_tiny(tmp_path) -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["with"] = {"depth": 8, "width": 4}
    recipe["data"].pop("with")  # native 8x8 digits
    for stage in recipe["stages"]:
        if stage["uses"] == "train":
            stage["with"] = {"epochs": 2, "lr": 1e-2}
        if stage["uses"] == "profile.latency":
            stage["with"] = {"batch_sizes": [1], "runs": 3, "warmup": 1}
        if stage["uses"] == "export.ort_quantize":
            stage["with"]["calibration_samples"] = 64
    result = slimline.run(recipe, run_dir=tmp_path, progress=False)
    export = result.record("export_int8").metrics
    assert export["format"] == "int8" and export["top1_agreement"] >= 0.98
    assert export["ort_int8_ops"] and not export["ort_float_ops"]
    assert export["onnx_bytes"] < result.record("export_fp32").metrics["onnx_bytes"]
    assert result.record("quant").metrics["folded_batchnorm"] == 9
    torch_int8 = result.record("eval_int8_torch").metrics
    assert torch_int8["reference"] == "train" and torch_int8["agreement"] >= 0.95
    onnx_int8 = result.record("eval_int8_onnx").metrics
    assert onnx_int8["backend"] == "onnx" and onnx_int8["agreement"] >= 0.95
    assert abs(onnx_int8["accuracy"] - torch_int8["accuracy"]) <= 0.01
    for profile in ("profile_fp32", "profile_int8", "profile_ort_int8"):
        assert result.record(profile).metrics["median_ms"] > 0
    # The quantized artifact reloads from disk (BN folded, hooks re-attached) and scores exactly
    # what the in-memory fake-quant model scored.
    reloaded = result.artifact("quant").model
    x, y = load_dataset("digits").split("test")
    with torch.no_grad():
        assert float((reloaded(x).argmax(1) == y).float().mean()) == torch_int8["accuracy"]
