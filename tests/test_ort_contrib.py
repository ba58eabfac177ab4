"""``int8_ops: onnxruntime``: each Linear's MatMul + bias as one com.microsoft.MatMulIntegerToFloat
(export/ort_contrib.py), checked against the QDQ file it rewrites."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimline.compress.deploy import ExportConfig, export_model
from slimline.compress.methods import quantize
from slimline.compress.quant.rtn import RTNConfig
from slimline.export import check_parity
from slimline.export.graph import graph_summary, load_model
from slimline.export.int8numerics import exact_on, first_divergence, int8_weight_ranges
from slimline.export.ort_contrib import (
    as_qdq,
    fuse_matmul_bias,
    fuse_matmul_bias_file,
    has_contrib_int8,
    unfuse_matmul_bias,
)
from slimline.export.qdq_inspect import qdq_summary
from slimline.export.target import TARGETS
from slimline.params import ParamError, parse_params
from tests.hf_models import build, dataset


def _run(source: str | bytes, feed: dict, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})[0]


def _optimized(path: Path, tmp_path: Path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    """A random-init BERT quantized by quant.rtn, exported both ways; its token feed."""
    tmp = tmp_path_factory.mktemp("contrib")
    model, spec = build("bert")
    data = dataset(spec)
    quantize(model, RTNConfig(), data=data, example_input=data.x_train[:1], input_spec=spec)
    qdq = export_model(model, data.x_train[:1], tmp / "qdq.onnx", ExportConfig(format="int8"),
                       parity_inputs=data.x_test)
    fused = export_model(model, data.x_train[:1], tmp / "fused.onnx",
                         ExportConfig(format="int8", int8_ops="onnxruntime"),
                         parity_inputs=data.x_test)
    ids = data.x_test.numpy().astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}
    return qdq, fused, feed, model, data.x_test


def test_every_biased_linear_becomes_one_kernel_with_its_bias(bert_files, tmp_path):
    qdq, fused, feed, _, _ = bert_files
    # 2 layers x (query, key, value, attention output, intermediate, output): all have biases
    assert fused.metrics["contrib_matmuls"] == 12 and fused.metrics["int8_ops"] == "onnxruntime"
    assert qdq.metrics["int8_ops"] == "qdq" and "contrib_matmuls" not in qdq.metrics
    ops = fused.metrics["op_counts"]
    assert ops.get("com.microsoft.MatMulIntegerToFloat") == 12 and "MatMul" in ops  # attention
    # What onnxruntime runs: the QDQ file's integer MatMuls carry no bias (an Add or a fused
    # LayerNorm/GELU adds it after); the rewritten file's carry it, and the bias Adds are gone.
    with_bias = {}
    for name, result in (("qdq", qdq), ("fused", fused)):
        graph = _optimized(result.path, tmp_path).graph
        kernels = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
        assert len(kernels) == 12
        with_bias[name] = sum(len(n.input) > 6 and bool(n.input[6]) for n in kernels)
    assert with_bias == {"qdq": 0, "fused": 12}
    # Same integer products and scales: the outputs agree to float rounding, and the QDQ
    # file's reference semantics are what the rewritten file's unfused form computes, exactly.
    a, b = _run(str(qdq.path), feed), _run(str(fused.path), feed)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    reference = _run(str(qdq.path), feed, optimize=False)
    unfused = as_qdq(load_model(fused.path))
    assert not has_contrib_int8(unfused) and has_contrib_int8(load_model(fused.path))
    assert np.array_equal(reference, _run(unfused.SerializeToString(), feed, optimize=False))


def test_int8_tools_read_the_rewritten_file_as_its_qdq_form(bert_files):
    qdq, fused, feed, model, x = bert_files
    assert qdq_summary(fused.path).weights == qdq_summary(qdq.path).weights
    summaries = [graph_summary(p) for p in (qdq.path, fused.path)]
    assert summaries[0].weight_count == summaries[1].weight_count > 12 * 32 * 32
    assert fused.metrics["dequantize_nodes"] == fused.metrics["op_counts"].get(
        "DequantizeLinear", 0) < qdq.metrics["dequantize_nodes"]
    assert qdq.metrics["int8_weights"] == fused.metrics["int8_weights"] == 12
    ranges = {(r.weight, r.kernel, r.max_level) for r in int8_weight_ranges(fused.path)}
    assert ranges == {(r.weight, r.kernel, r.max_level) for r in int8_weight_ranges(qdq.path)}
    # Saturation analysis sees the weights inside the contrib nodes: a full-range file is not
    # exact on an AVX2 CPU (7-bit weights needed), whichever form it is written in.
    full_range = max(r.max_level for r in int8_weight_ranges(fused.path)) > 64
    for path in (qdq.path, fused.path):
        assert exact_on(path, TARGETS["x86-vnni"])
        assert exact_on(path, TARGETS["x86-avx2"]) is not full_range
    # The reference run (no graph optimizations, as on a CPU that would saturate) is the QDQ
    # file's, not the contrib kernels' integer arithmetic.
    reference = [check_parity(model, p, x, optimize=False).max_abs_diff for p in (qdq.path, fused.path)]
    assert reference[0] == reference[1]
    if exact_on(fused.path):  # this CPU computes it exactly: fused and reference agree
        inputs = {i.name for i in load_model(fused.path).graph.input}
        assert first_divergence(fused.path, {k: v for k, v in feed.items() if k in inputs}) is None


def _linear_graph() -> onnx.ModelProto:
    """x -> Q -> DQ feeding five MatMuls: one fusable Linear and four that are not."""
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, (4, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "sx"),
        numpy_helper.from_array(np.uint8(128), "zx"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(3, 0.01, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(3, np.int8), "zw"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "sw_rows"),
        numpy_helper.from_array(np.zeros(4, np.int8), "zw_rows"),
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w_float"),
        numpy_helper.from_array(np.arange(3, dtype=np.float32), "b"),
        numpy_helper.from_array(np.ones((2, 3), np.float32), "b_2d"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
        helper.make_node("DequantizeLinear", ["w", "sw_rows", "zw_rows"], ["wd_rows"], axis=0),
        helper.make_node("MatMul", ["xd", "wd"], ["m1"]),  # the Linear: fused
        helper.make_node("Add", ["b", "m1"], ["y1"]),  # bias first: still a bias
        helper.make_node("MatMul", ["xd", "w_float"], ["m2"]),  # float weight
        helper.make_node("Add", ["m2", "b"], ["y2"]),
        helper.make_node("MatMul", ["xd", "wd"], ["m3"]),  # its output read twice
        helper.make_node("Add", ["m3", "b"], ["y3"]),
        helper.make_node("Relu", ["m3"], ["y3r"]),
        helper.make_node("MatMul", ["xd", "wd_rows"], ["m4"]),  # weight scaled per row
        helper.make_node("Add", ["m4", "b"], ["y4"]),
        helper.make_node("MatMul", ["xd", "wd"], ["m5"]),  # a (2, 3) addend, not a bias
        helper.make_node("Add", ["m5", "b_2d"], ["y5"]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])
               for n in ("y1", "y2", "y3", "y3r", "y4", "y5")]
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 4])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_only_the_pattern_the_kernel_computes_as_written_is_rewritten():
    model = _linear_graph()
    feed = {"x": np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)}
    before = [_run(model.SerializeToString(), feed, optimize=False)]
    assert fuse_matmul_bias(model) == 1
    onnx.checker.check_model(model)
    fused = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert [list(n.input) for n in fused] == [["xq", "w", "sx", "sw", "zx", "zw", "b"]]
    assert fused[0].output == ["y1"] and fused[0].domain == "com.microsoft"
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 4
    assert any(n.output == ["xd"] for n in model.graph.node)  # still read by the others
    got = _run(model.SerializeToString(), feed)
    session = ort.InferenceSession(_linear_graph().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(["y1"], feed)[0], rtol=1e-5)
    assert unfuse_matmul_bias(model) == 1 and not has_contrib_int8(model)
    assert np.array_equal(before[0], _run(model.SerializeToString(), feed, optimize=False))


def test_signed_activations_with_unsigned_weights_are_left_qdq():
    """int8 x uint8 is the one pair onnxruntime's MatMulIntegerToFloat does not implement."""
    model = _linear_graph()
    inits = {t.name: t for t in model.graph.initializer}
    inits["zx"].CopyFrom(numpy_helper.from_array(np.int8(0), "zx"))
    inits["w"].CopyFrom(numpy_helper.from_array(np.full((4, 3), 7, np.uint8), "w"))
    inits["zw"].CopyFrom(numpy_helper.from_array(np.full(3, 7, np.uint8), "zw"))
    assert fuse_matmul_bias(model) == 0


def test_readers_inside_a_subgraph_keep_a_tensor_as_it_is():
    model = _linear_graph()
    body = helper.make_graph([helper.make_node("Identity", ["m1"], ["inner"])], "body", [],
                             [helper.make_tensor_value_info("inner", TensorProto.FLOAT, [2, 3])])
    flag = numpy_helper.from_array(np.array(True), "flag")
    model.graph.initializer.append(flag)
    model.graph.node.append(helper.make_node("If", ["flag"], ["branch"], then_branch=body,
                                             else_branch=body))
    model.graph.output.append(helper.make_tensor_value_info("branch", TensorProto.FLOAT, [2, 3]))
    assert fuse_matmul_bias(model) == 0  # the If reads the MatMul's output


def test_fusing_a_file_without_the_pattern_leaves_it_untouched(tmp_path):
    path = tmp_path / "float.onnx"
    model = _linear_graph()
    model.graph.node.remove(model.graph.node[4])  # the one fusable MatMul ...
    model.graph.node.remove(model.graph.node[4])  # ... and its Add
    del model.graph.output[0]
    onnx.save(model, path)
    shutil.copy(path, tmp_path / "copy.onnx")
    assert fuse_matmul_bias_file(path) == 0
    assert path.read_bytes() == (tmp_path / "copy.onnx").read_bytes()


def test_int8_ops_is_checked_where_the_recipe_sets_it():
    with pytest.raises(ParamError, match="did you mean 'onnxruntime'"):
        parse_params(ExportConfig, {"format": "int8", "int8_ops": "onnxruntim"})
    with pytest.raises(ParamError, match="int8_ops.*format int8"):
        parse_params(ExportConfig, {"int8_ops": "onnxruntime"})
    assert parse_params(ExportConfig, {"format": "int8", "int8_ops": "onnxruntime"}).int8_ops \
        == "onnxruntime"


def test_every_reference_run_of_a_rewritten_file_runs_its_qdq_form(bert_files, monkeypatch):
    """Graph optimizations off must not run integer kernels (on an AVX2 CPU they would saturate
    full-range weights): each reader hands onnxruntime the unfused QDQ form instead."""
    from slimline.evaluation import predict_onnx
    from slimline.export.int8_evaluation import compare_onnx_models
    from slimline.export.int8numerics import reference_outputs

    qdq, fused, feed, model, x = bert_files
    inputs = {i.name for i in load_model(fused.path).graph.input}
    feed = {k: v for k, v in feed.items() if k in inputs}
    opened = []
    real = ort.InferenceSession

    def recording(source, sess_options=None, *args, **kwargs):
        if (sess_options is not None and sess_options.graph_optimization_level
                == ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
            proto = onnx.ModelProto()
            if isinstance(source, bytes):
                proto.ParseFromString(source)
            else:
                proto = load_model(source)
            opened.append(has_contrib_int8(proto))
        return real(source, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    check_parity(model, fused.path, x, optimize=False)
    predict_onnx(fused.path, x, optimize=False, model=model)
    compare_onnx_models(qdq.path, fused.path, x.numpy(), int8_reference=True)
    reference_outputs(fused.path, feed)
    first_divergence(fused.path, feed)
    assert len(opened) >= 5 and not any(opened)


def test_profiler_points_at_int8_ops_when_biases_run_outside_the_kernel(bert_files):
    from slimline.export.int8check import int8_warnings, unfused_qdq
    from slimline.export.machine import machine_info

    qdq, fused, *_ = bert_files
    # q, k and v of both layers: their biases are read by no LayerNorm/GELU fusion
    assert unfused_qdq(qdq.path).separate_bias_adds == 6
    assert unfused_qdq(fused.path).separate_bias_adds == 0
    hints = [w for w in int8_warnings(qdq.path, machine=machine_info()) if "int8_ops" in w]
    assert len(hints) == 1 and "6 integer MatMuls" in hints[0]
    assert not [w for w in int8_warnings(fused.path, machine=machine_info()) if "int8_ops" in w]


@pytest.mark.parametrize("name", ["gpt2", "vit", "torch-encoder"])
def test_other_user_models_export_with_onnxruntime_ops(name, tmp_path):
    """GPT-2 (Conv1D layers made Linears), HF ViT and torch's TransformerEncoder: every Linear
    with a bias and int8 weights becomes one kernel, and the file computes what the QDQ one does."""
    from slimline.export.onnx_export import onnx_feeds

    model, spec = build(name)
    data = dataset(spec)
    quantize(model, RTNConfig(), data=data, example_input=data.x_train[:1], input_spec=spec)
    files = {ops: export_model(model, data.x_train[:1], tmp_path / f"{ops}.onnx",
                               ExportConfig(format="int8", int8_ops=ops),
                               parity_inputs=data.x_test)
             for ops in ("qdq", "onnxruntime")}
    fused = files["onnxruntime"].metrics
    assert fused["contrib_matmuls"] >= 4
    assert fused["op_counts"]["com.microsoft.MatMulIntegerToFloat"] == fused["contrib_matmuls"]
    names = [i.name for i in load_model(files["qdq"].path).graph.input]
    feed = onnx_feeds(model, data.x_test, names)
    a, b = (_run(str(f.path), feed) for f in files.values())
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_bias_hint_counts_only_what_the_rewrite_would_fuse():
    from slimline.export.int8check import _separate_bias_adds

    inits = [numpy_helper.from_array(np.ones((4, 3), np.int8), "w"),
             numpy_helper.from_array(np.ones(3, np.float32), "b"),
             numpy_helper.from_array(np.ones(1, np.float32), "one")]
    nodes = []
    for i, addend in enumerate(("b", "one", "b")):
        nodes += [helper.make_node("MatMulIntegerToFloat", ["xq", "w", "s", "s"], [f"m{i}"],
                                   domain="com.microsoft"),
                  helper.make_node("Add", [f"m{i}", addend], [f"y{i}"])]
    outputs = ["y0", "y1", "y2", "m2"]  # m2 is read outside the graph too: not fusable
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(
        n, TensorProto.FLOAT, None) for n in outputs], inits)
    assert _separate_bias_adds(graph) == 1  # only y0: a (3,) float bias of an unshared MatMul
