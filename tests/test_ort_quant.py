"""Baseline int8 PTQ with onnxruntime.quantization, the ``export.ort_quantize`` stage, and the
profiler's "int8 will not help here" diagnostics.

The digits classifier is built with ``onnx.helper`` (random conv features + a ridge-regression
head fitted in numpy), so the library tests need no torch and no training loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimline.export.graph import OnnxFileError, graph_summary
from slimline.export.int8_evaluation import compare_onnx_models
from slimline.export.int8check import Int8Warning, int8_warnings, isa_warning, unfused_qdq
from slimline.export.latency import profile_onnx
from slimline.export.ort_quant import QuantizationError, ort_quantize
from tests.test_latency import _save, mlp


def _model(nodes, inputs, outputs, initializers, path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32)[:, None] / 16.0 - 0.3) / 0.4
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return {
        "x_train": x[train],
        "y_train": bunch.target[train],
        "x_test": x[test],
        "y_test": bunch.target[test],
    }


@pytest.fixture(scope="module")
def conv_classifier(tmp_path_factory, digits) -> Path:
    """input[batch,1,8,8] -> Conv(24, 3x3) -> Relu -> Flatten -> Gemm -> logits[batch,10]."""
    folder = tmp_path_factory.mktemp("quant")
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((24, 1, 3, 3)).astype(np.float32), "w")
    conv_nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["features"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])]
    features_path = _model(
        conv_nodes,
        inputs,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 1536])],
        [weight],
        folder / "features.onnx",
    )
    session = ort.InferenceSession(str(features_path), providers=["CPUExecutionProvider"])
    features = session.run(None, {"input": digits["x_train"]})[0].astype(np.float64)
    targets = np.eye(10)[digits["y_train"]]
    # Ridge regression: a head good enough (~97%) that quantization error is what we measure.
    head = np.linalg.solve(features.T @ features + 10.0 * np.eye(1536), features.T @ targets)
    return _model(
        [*conv_nodes, helper.make_node("Gemm", ["features", "head"], ["logits"])],
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weight, numpy_helper.from_array(head.astype(np.float32), "head")],
        folder / "digits_conv.onnx",
    )


def test_static_quantization_writes_fused_qdq_with_int8_weights_and_keeps_accuracy(
    conv_classifier, digits, tmp_path
):
    out = ort_quantize(conv_classifier, tmp_path / "int8.onnx", calibration=digits["x_train"][:128])
    summary = graph_summary(out)
    assert summary.quant_format == "qdq"
    assert summary.quantize_nodes >= 2 and summary.dequantize_nodes >= 3
    assert summary.int8_initializers >= 2  # conv and gemm weights (+ zero points)
    assert summary.initializer_bytes_by_dtype["int8"] >= 24 * 9 + 1536 * 10
    assert summary.file_bytes < 0.4 * graph_summary(conv_classifier).file_bytes
    # Int8 weights count as weights: their zeros are the zero point, not literal 0.
    assert summary.weight_count == 24 * 9 + 1536 * 10
    # U8S8 QDQ is what onnxruntime's CPU kernels fuse: no conv/gemm left running in float.
    assert unfused_qdq(out).float_compute_nodes == ()

    scores = compare_onnx_models(conv_classifier, out, digits["x_test"], digits["y_test"])
    assert scores.fp32_accuracy > 0.93
    assert scores.accuracy >= scores.fp32_accuracy - 0.02
    assert scores.top1_agreement >= 0.97
    # Logits of this head are ~1: errors are a few percent on average, worst case under half.
    assert 0 < scores.mean_abs_error < 0.05 and scores.max_rel_error < 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]  # no temp files left


def test_dynamic_quantization_quantizes_the_gemm_without_calibration(
    conv_classifier, digits, tmp_path
):
    out = ort_quantize(conv_classifier, tmp_path / "dyn.onnx", calibration=None, mode="dynamic")
    summary = graph_summary(out)
    assert summary.quant_format == "dynamic" and summary.quantize_nodes == 0
    assert "MatMulInteger" in summary.op_counts and summary.op_counts["Conv"] == 1
    scores = compare_onnx_models(conv_classifier, out, digits["x_test"], digits["y_test"])
    assert scores.top1_agreement >= 0.98


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (None, "needs calibration inputs"),
        ("rank", r"rank 3\); the model expects rank 4"),
        ("dims", "dim 2 must be 8"),
        ("names", "do not match the model inputs"),
    ],
)
def test_bad_calibration_is_refused_and_writes_nothing(
    calibration, match, conv_classifier, digits, tmp_path
):
    data = {
        None: None,
        "rank": digits["x_train"][:8, 0],
        "dims": digits["x_train"][:8, :, :4],
        "names": {"pixels": digits["x_train"][:8]},
    }[calibration]
    with pytest.raises(QuantizationError, match=match):
        ort_quantize(conv_classifier, tmp_path / "out.onnx", calibration=data)
    assert list(tmp_path.iterdir()) == []


def test_already_quantized_non_onnx_and_nothing_to_quantize_are_clear_errors(
    conv_classifier, digits, tmp_path
):
    calibration = digits["x_train"][:32]
    int8 = ort_quantize(conv_classifier, tmp_path / "int8.onnx", calibration=calibration)
    with pytest.raises(QuantizationError, match="already quantized.*qdq"):
        ort_quantize(int8, tmp_path / "again.onnx", calibration=calibration)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    with pytest.raises(OnnxFileError, match="notes.onnx"):
        ort_quantize(text, tmp_path / "x.onnx", calibration=calibration)
    relu = _model(
        [helper.make_node("Relu", ["input"], ["logits"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [],
        tmp_path / "relu.onnx",
    )
    with pytest.raises(QuantizationError, match="quantized nothing"):
        ort_quantize(relu, tmp_path / "relu8.onnx", calibration=None, mode="dynamic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "notes.onnx", "relu.onnx"]


def test_stage_quantizes_the_export_and_profile_follows_the_int8_file(tmp_path, tiny_recipe):
    import slimline

    tiny_recipe["stages"] = [
        {"id": "train", "uses": "train", "with": {"epochs": 2}},
        {"id": "export", "uses": "export.onnx", "with": {"parity_samples": 16}},
        {"id": "int8", "uses": "export.ort_quantize", "with": {"calibration_samples": 64}},
        {
            "id": "latency",
            "uses": "profile.latency",
            "with": {"batch_sizes": [1], "runs": 10, "warmup": 2, "per_op_runs": 5},
        },
    ]
    result = slimline.run(tiny_recipe, run_dir=tmp_path / "run", progress=False)
    metrics = result.record("int8").metrics
    int8_file = result.artifact("int8").files["onnx"]
    assert (
        int8_file.name == "model.int8.onnx" and int8_file.parent == result.record("int8").directory
    )
    assert metrics["quant_format"] == "qdq" and metrics["quantize_nodes"] > 0
    assert metrics["int8_initializers"] >= 2 and metrics["calibration_samples"] == 64
    assert metrics["samples"] == 359 and metrics["source_stage"] == "export"
    assert metrics["reference"] == "export (fp32 ONNX)"  # the report names what it is vs
    assert metrics["accuracy"] >= metrics["fp32_accuracy"] - 0.05
    assert metrics["top1_agreement"] > 0.9 and metrics["size_ratio"] < 1.0
    assert metrics["op_counts"]["DequantizeLinear"] == metrics["dequantize_nodes"]
    latency = result.record("latency").metrics
    assert latency["quant_format"] == "qdq" and latency["onnx_bytes"] == metrics["onnx_bytes"]
    assert abs(sum(op["share"] for op in latency["op_breakdown"]["1"]["ops"].values()) - 1) < 1e-6


def test_stage_without_an_onnx_input_names_the_fix(tmp_path, tiny_recipe):
    import slimline
    from slimline.stage import StageFailed

    tiny_recipe["stages"] = [{"id": "int8", "uses": "export.ort_quantize"}]
    with pytest.raises(StageFailed, match="put an export.onnx stage in its 'needs'"):
        slimline.run(tiny_recipe, run_dir=tmp_path / "run", progress=False)


# --- int8 diagnostics (slimline.export.int8check) ------------------------------------------------

VNNI_MACHINE = {"arch": "x86_64", "cpu": "test", "isa_flags": ["avx2", "avx512_vnni"]}


def qdq_conv(path: Path, *, qoperator: bool = False) -> Path:
    """A hand-made int8 conv. QDQ: x -> Q -> DQ -> Conv(DQ(int8 w)) -> float output, a pattern
    onnxruntime cannot fuse (no Q after the Conv). QOperator: x -> Q -> QLinearConv -> DQ."""
    weight = np.zeros((4, 4, 3, 3), np.int8)
    weight[:, :, 1, 1] = 7
    weight[0] = 3  # per-channel zero points below: channel 0's weights all equal its zero point
    zero_points = np.array([3, 0, 0, 0], np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(zero_points, "w_zp"),
        numpy_helper.from_array(np.array(0.1, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
    ]
    if qoperator:
        inits[4] = numpy_helper.from_array(np.zeros(4, np.int8), "w_zp")
        nodes = [
            helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["xq"]),
            helper.make_node(
                "QLinearConv",
                ["xq", "x_scale", "x_zp", "w_q", "w_scale", "w_zp", "y_scale", "y_zp"],
                ["yq"],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["out"]),
        ]
    else:
        nodes = [
            helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
            helper.make_node("Conv", ["xd", "w"], ["out"], pads=[1, 1, 1, 1], name="conv0"),
        ]
    graph = helper.make_graph(
        nodes,
        "int8conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=inits,
    )
    return _save(graph, path)


def test_int8_warnings_fire_for_unfused_qdq_and_qoperator_models(tmp_path):
    unfused = qdq_conv(tmp_path / "unfused.onnx")
    summary = graph_summary(unfused)
    assert summary.quant_format == "qdq" and summary.int8_initializers == 4
    # Zeros of int8 weights are the zero point: all of channel 0 (zp 3) and, in channels 1-3
    # (zp 0), all but the centre taps.
    assert summary.weight_count == 144 and summary.weight_zeros == 36 + 3 * (36 - 4)
    with pytest.warns(Int8Warning, match=r"1 of 1 quantized compute nodes still run in float"):
        report = profile_onnx(unfused, runs=2, warmup=0)
    assert "Conv conv0" in report.diagnostics[-1] and report.quant_format == "qdq"

    qoperator = qdq_conv(tmp_path / "qop.onnx", qoperator=True)
    messages = int8_warnings(qoperator, machine=VNNI_MACHINE)
    assert len(messages) == 1 and "QOperator-format int8 model (QLinearConv x1)" in messages[0]
    assert int8_warnings(mlp(tmp_path / "float.onnx"), machine={}) == []  # float: nothing to say


def test_isa_warning_needs_int8_dot_product_instructions():
    assert isa_warning(VNNI_MACHINE) is None
    assert isa_warning({"arch": "x86_64", "isa_flags": ["amx_int8"]}) is None
    assert isa_warning({"arch": "aarch64", "isa_flags": ["asimddp"]}) is None
    assert isa_warning({"arch": "riscv64", "isa_flags": []}) is None  # unknown: no claim
    message = isa_warning({"arch": "x86_64", "cpu": "Old Xeon", "isa_flags": ["avx2"]})
    assert "Old Xeon" in message and "avx512_vnni" in message and "reduce_range" in message
    assert "asimddp" in isa_warning({"arch": "aarch64", "isa_flags": []})
