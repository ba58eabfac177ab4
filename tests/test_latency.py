"""Latency profiler, ``slimline profile`` CLI and torch-free graph tools.

Models are built with ``onnx.helper`` so this file never needs torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimline.export import (
    BatchLatency,
    LatencyReport,
    OnnxFileError,
    compare_table,
    graph_summary,
    machine_info,
    main_profile,
    profile_onnx,
)
from slimline.export.compare import CSV_COLUMNS, MixedMachinesWarning
from slimline.export.opprofile import OpProfile, parse_ort_profile

REPO_ROOT = Path(__file__).resolve().parents[1]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what onnxruntime has supported for a long time
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp(path: Path, batch: int | str = "batch", features: int = 16) -> Path:
    """input[batch, features] -> MatMul -> Add -> Relu -> logits[batch, 8]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((features, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 8])],
        initializer=[weight, bias],
    )
    return _save(graph, path)


def embedding(path: Path) -> Path:
    """tokens[batch, "seq"] (int64) -> Gather from a 10x4 table -> ReduceMean -> out[batch, 4]."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "tokens"], ["e"]),
            helper.make_node("ReduceMean", ["e", "axes"], ["out"], keepdims=0),
        ],
        "embed",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        initializer=[table, axes],
    )
    return _save(graph, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("models")
    return mlp(folder / "small.onnx", features=16), mlp(folder / "wide.onnx", features=256)


def test_profile_honours_batch_sizes_and_runs_with_sorted_percentiles(models):
    report = profile_onnx(models[0], batch_sizes=(1, 4), warmup=2, runs=15)
    assert [b.batch_size for b in report.batches] == [1, 4]
    for b in report.batches:
        assert b.runs == len(b.samples_ms) == 15
        assert 0 < b.min_ms <= b.median_ms <= b.p90_ms <= b.p99_ms <= max(b.samples_ms)
        assert b.min_ms <= b.mean_ms and b.std_ms >= 0
        assert b.throughput == pytest.approx(b.batch_size * 1000 / b.median_ms)
    assert report.providers == ("CPUExecutionProvider",)
    assert report.intra_op_threads == 1 and report.inter_op_threads == 1
    assert report.file_bytes == models[0].stat().st_size
    assert report.machine["onnxruntime"]

    data = json.loads(json.dumps(report.to_dict()))
    assert "samples_ms" not in data["batches"][0]
    assert LatencyReport.from_dict(data) == report  # samples are excluded from equality
    with_samples = report.to_dict(include_samples=True)
    assert len(with_samples["batches"][1]["samples_ms"]) == 15


def test_profile_duration_mode_runs_at_least_five_times(models):
    report = profile_onnx(models[0], warmup=0, runs=1, duration_s=0.02)
    assert report.batches[0].runs >= 5


def test_percentiles_from_known_samples():
    stats = BatchLatency.from_samples(8, [float(x) for x in range(1, 101)])
    assert stats.min_ms == 1 and stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.throughput == pytest.approx(8 / 0.0505)


def test_dynamic_non_batch_dim_needs_input_shapes(tmp_path):
    path = embedding(tmp_path / "embed.onnx")
    with pytest.raises(ValueError, match=r"'tokens' dim 1 \('seq'\) is dynamic"):
        profile_onnx(path, runs=1, warmup=0)
    report = profile_onnx(path, batch_sizes=(3,), runs=2, warmup=0, input_shapes={"tokens": [1, 6]})
    assert report.batches[0].batch_size == 3
    with pytest.raises(ValueError, match="not model inputs"):
        profile_onnx(path, runs=1, input_shapes={"typo": [1, 6]})


def test_fixed_batch_model_rejects_other_batch_sizes(tmp_path):
    path = mlp(tmp_path / "fixed.onnx", batch=1)
    assert profile_onnx(path, batch_sizes=(1,), runs=2, warmup=0).batches[0].runs == 2
    with pytest.raises(ValueError, match="fixed batch dimension of 1"):
        profile_onnx(path, batch_sizes=(4,), runs=2, warmup=0)


def test_unavailable_provider_warns_and_falls_back_to_cpu(models):
    with pytest.warns(RuntimeWarning, match="NoSuchExecutionProvider not available"):
        report = profile_onnx(models[0], runs=2, warmup=0, providers=("NoSuchExecutionProvider",))
    assert report.providers == ("CPUExecutionProvider",)
    assert report.requested_providers == ("NoSuchExecutionProvider",)


def test_profile_rejects_missing_and_non_onnx_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        profile_onnx(tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("definitely not a model\n")
    with pytest.raises(OnnxFileError, match="notes.onnx"):
        profile_onnx(text)


def test_compare_table_ratios_against_first_model():
    def report(name: str, medians: dict[int, float]) -> LatencyReport:
        batches = tuple(BatchLatency.from_samples(bs, [m] * 5) for bs, m in medians.items())
        return LatencyReport(
            model=f"/models/{name}",
            file_bytes=2048,
            providers=("CPUExecutionProvider",),
            requested_providers=("CPUExecutionProvider",),
            intra_op_threads=1,
            inter_op_threads=1,
            graph_optimization="all",
            warmup=0,
            batches=batches,
            machine={},
        )

    table = compare_table([report("base.onnx", {1: 2.0, 8: 4.0}), report("fast.onnx", {1: 1.0})])
    lines = table.splitlines()
    assert lines[0].startswith("| model") and "vs first" in lines[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[2], r[-1]) for r in rows] == [
        ("base.onnx", "1", "1.00x"),
        ("base.onnx", "8", "1.00x"),
        ("fast.onnx", "1", "0.50x"),
    ]
    assert rows[0][1] == "2.0 KiB" and rows[2][3] == "1.000"


def test_cli_json_output_and_file(models, tmp_path, capsys):
    out = tmp_path / "reports" / "latency.json"
    argv = [str(m) for m in models]
    argv += ["--batch-sizes", "1,2", "--runs", "5", "--warmup", "1", "--json", "--output", str(out)]
    assert main_profile(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in printed["reports"]] == [str(m) for m in models]
    for r in printed["reports"]:
        assert [b["batch_size"] for b in r["batches"]] == [1, 2]
        assert all(b["runs"] == 5 for b in r["batches"])
    assert json.loads(out.read_text()) == printed
    assert [p.name for p in out.parent.iterdir()] == ["latency.json"]  # no temp files left


def test_cli_prints_table_by_default(models, capsys):
    assert main_profile([str(models[0]), "--runs", "3", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model") and "small.onnx" in out and "1.00x" in out


@pytest.mark.parametrize("kind", ["missing", "text", "bad-flag"])
def test_cli_bad_input_exits_2_with_one_line(kind, models, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    argv = [str(target)]
    if kind == "text":
        target.write_text("hello\n")
    elif kind == "bad-flag":
        argv = [str(models[0]), "--batch-sizes", "one"]
    assert main_profile(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("slimline profile: error:")
    if kind != "bad-flag":
        assert len(captured.err.strip().splitlines()) == 1 and "model.onnx" in last


def test_machine_info_describes_the_host():
    info = machine_info()
    assert info["cpu"] and info["logical_cores"] >= 1 and info["available_cores"] >= 1
    assert isinstance(info["isa_flags"], list)
    assert {"onnxruntime", "numpy", "python", "os"} <= set(info)
    info["cpu"] = "changed"
    assert machine_info()["cpu"] != "changed"  # callers get a copy of the cached dict


def test_graph_summary_of_a_handmade_model_counts_subgraph_ops(tmp_path):
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y1"])],
        "then",
        [],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [None, 4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y2"]), helper.make_node("Relu", ["y2"], ["y3"])],
        "else",
        [],
        [helper.make_tensor_value_info("y3", TensorProto.FLOAT, [None, 4])],
    )
    weight = np.zeros((4, 4), np.float32)
    weight[0] = 1.0  # 4 of 16 weights non-zero: sparsity 0.75
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["x"]),
            helper.make_node(
                "If", ["flag"], ["out"], then_branch=then_graph, else_branch=else_graph
            ),
        ],
        "branchy",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])],
        initializer=[
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.ones(3, np.float32), "bias"),
        ],
    )
    summary = graph_summary(_save(graph, tmp_path / "branchy.onnx"))
    assert summary.op_counts == {"If": 1, "MatMul": 1, "Neg": 1, "Relu": 2}
    assert summary.parameter_count == 19 and summary.nonzero_parameters == 7
    assert summary.weight_count == 16 and summary.sparsity == pytest.approx(0.75)
    assert summary.inputs[0].shape == (None, 4) and summary.inputs[1].dtype == "bool"


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n", "zip"])
def test_graph_summary_rejects_non_onnx_files(content, tmp_path):
    path = tmp_path / "thing.onnx"
    if content == "zip":  # what a torch .pt checkpoint looks like on disk
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    else:
        path.write_bytes(content)
    with pytest.raises(OnnxFileError, match="not an ONNX model"):
        graph_summary(path)


def test_latency_and_graph_import_and_run_without_torch(models):
    script = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        from slimline import export
        import slimline.export.graph
        import slimline.export.latency
        import slimline.export.int8check, slimline.export.lut, slimline.export.opprofile
        import slimline.export.ort_quant, slimline.export.plot

        report = export.profile_onnx(
            sys.argv[1], batch_sizes=(1, 2), warmup=1, runs=3, per_op=True, per_op_runs=2
        )
        summary = export.graph_summary(sys.argv[1])
        assert "Gemm" in report.op_profiles[1].ops[0].op_type  # MatMul+Add+Relu -> FusedGemm
        assert export.main_profile([sys.argv[1], "--runs", "2", "--per-op"]) == 0
        assert "torch" not in sys.modules
        try:
            export.export_onnx
        except ImportError:
            print("export_onnx is lazy")
        print(report.batches[1].runs, summary.op_counts["MatMul"])
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script, str(models[0])],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-3:-1] == ["export_onnx is lazy", "3 1"]


# --- per-op breakdown, CSV, plot, machines, int8 diagnostics, bad input ----------------------


def conv_net(path: Path) -> Path:
    """input[batch,8,16,16] -> 2 x (3x3 Conv, 32 channels) + Relu -> pool -> Gemm -> [batch,10]."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(0.1 * rng.standard_normal(shape).astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["logits"]),
        ],
        "convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[init("w1", 32, 8, 3, 3), init("w2", 32, 32, 3, 3), init("fc", 32, 10)],
    )
    return _save(graph, path)


def test_per_op_shares_sum_to_one_and_conv_dominates_a_conv_net(tmp_path):
    path = conv_net(tmp_path / "conv.onnx")
    report = profile_onnx(path, batch_sizes=(1, 4), warmup=3, runs=5, per_op=True, per_op_runs=8)
    assert [p.batch_size for p in report.op_profiles] == [1, 4]
    for profile in report.op_profiles:
        assert profile.runs == 8
        assert sum(op.share for op in profile.ops) == pytest.approx(1.0)
        top = profile.ops[0]  # onnxruntime may run Conv+Relu as FusedConv
        assert "Conv" in top.op_type and top.share > 0.5 and top.nodes == 2
        assert profile.kernel_ms == pytest.approx(sum(op.ms_per_run for op in profile.ops))
        assert 0 <= profile.overhead_share < 1
    data = json.loads(json.dumps(report.to_dict()))
    assert LatencyReport.from_dict(data).op_profiles == report.op_profiles


def test_parse_ort_profile_drops_warmup_and_takes_per_run_medians():
    def run(ts: int, dur: int) -> dict:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(node: str, op: str, ts: int, dur: int) -> dict:
        return {
            "cat": "Node",
            "name": f"{node}_kernel_time",
            "ts": ts,
            "dur": dur,
            "args": {"op_name": op},
        }

    events = [run(0, 500), kernel("a", "Conv", 1, 400)]  # warm-up: slow, skipped
    for i, conv in enumerate((30, 30, 90)):  # the 90 us run is an outlier: medians ignore it
        start = 1000 * (i + 1)
        events += [
            run(start, 100),
            kernel("a", "Conv", start + 1, conv // 3),
            kernel("b", "Conv", start + 40, 2 * conv // 3),
            kernel("c", "Gemm", start + 80, 10),
        ]
    profile = parse_ort_profile(events, batch_size=2, skip_runs=1)
    assert profile.runs == 3 and profile.batch_size == 2 and profile.run_ms == 0.1
    assert [(op.op_type, op.nodes) for op in profile.ops] == [("Conv", 2), ("Gemm", 1)]
    assert profile.ops[0].ms_per_run == pytest.approx(0.030)
    assert profile.share("Conv") == pytest.approx(0.75) and profile.share("Relu") == 0
    assert OpProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    with pytest.raises(ValueError, match="no model runs"):
        parse_ort_profile(events, skip_runs=4)


def test_cli_writes_csv_rows_png_plot_and_per_op_tables(models, tmp_path, capsys):
    csv_path, png_path = tmp_path / "lat.csv", tmp_path / "plots" / "lat.png"
    argv = [str(m) for m in models] + ["--batch-sizes", "1,3", "--runs", "4", "--warmup", "1"]
    argv += ["--csv", str(csv_path), "--plot", str(png_path), "--per-op", "3", "--per-op-runs", "2"]
    assert main_profile(argv) == 0
    out = capsys.readouterr().out
    assert out.count("per-op breakdown:") == 4 and "Gemm" in out  # ORT fuses MatMul+Add+Relu
    import csv

    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("small.onnx", "1"),
        ("small.onnx", "3"),
        ("wide.onnx", "1"),
        ("wide.onnx", "3"),
    ]
    assert rows[0]["vs_first"] == "1.0000" and all(float(r["median_ms"]) > 0 for r in rows)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_reports_from_two_machines_are_never_mixed(models, tmp_path, capsys):
    saved = tmp_path / "here.json"
    assert main_profile([str(models[0]), "--runs", "3", "--output", str(saved)]) == 0
    data = json.loads(saved.read_text())
    data["reports"][0]["machine"] |= {"cpu": "Other CPU", "isa_flags": []}
    other = tmp_path / "there.json"
    other.write_text(json.dumps(data))
    capsys.readouterr()
    assert main_profile([str(saved), str(other), str(models[1]), "--runs", "3"]) == 0
    captured = capsys.readouterr()
    assert "2 different machines" in captured.err
    first, second = captured.out.split("machine 2:")
    assert first.startswith("machine 1:") and "wide.onnx" in first and "1.00x" in first
    assert "Other CPU" in second and "wide.onnx" not in second
    reports = [LatencyReport.from_dict(r) for r in data["reports"]]
    with pytest.warns(MixedMachinesWarning):
        compare_table([*reports, profile_onnx(models[0], runs=2, warmup=0)])


@pytest.mark.parametrize("case", ["unsupported-op", "input-rank", "input-dims", "qoperator-qdq"])
def test_cli_bad_models_and_shapes_exit_2_naming_the_cause(case, models, tmp_path, capsys):
    output = tmp_path / "out" / "report.json"
    if case == "unsupported-op":
        graph = helper.make_graph(
            [helper.make_node("Frobnicate", ["input"], ["logits"], domain="com.example")],
            "custom",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)],
        )
        model.ir_version = 10
        onnx.save(model, str(tmp_path / "custom.onnx"))
        argv, expected = [str(tmp_path / "custom.onnx")], "op com.example.Frobnicate is not"
    elif case == "input-rank":
        argv, expected = [str(models[0]), "--input-shape", "input=1,16,1"], "has 3 dims"
    elif case == "input-dims":
        argv, expected = [str(models[0]), "--input-shape", "input=1,15"], "fixes it to 16"
    else:
        from tests.test_ort_quant import qdq_conv

        path = qdq_conv(tmp_path / "qop.onnx", qoperator=True)
        argv, expected = [str(path), "--require-qdq"], "is not an int8 QDQ model: it is a QOp"
    assert main_profile([*argv, "--runs", "2", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimline profile: error:") and expected in err[0]
    assert not output.parent.exists()  # no partial outputs
