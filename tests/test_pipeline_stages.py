"""Stages end to end on real data: export parity, profiling, failures that name their cause."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

import slimline
from slimline.progress import Progress
from slimline.stage import StageFailed


def test_export_and_profile_stages(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["stages"] += [
        {"id": "export", "uses": "export.onnx"},
        {"id": "profile", "uses": "profile.latency",
         "with": {"batch_sizes": [1, 4], "runs": 5, "warmup": 1}},
        {"id": "eval_onnx", "uses": "eval", "needs": ["export"], "with": {"backend": "onnx"}},
    ]
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    export = result.record("export").metrics
    assert export["max_abs_diff"] < 1e-4 and export["top1_agreement"] == 1.0
    assert export["parity_samples"] == 64
    # The pruned weights are still zero inside the ONNX initializers.
    assert export["onnx_sparsity"] == pytest.approx(
        result.record("prune").metrics["sparsity"], abs=0.02)
    onnx_file = result.artifact("export").files["onnx"]
    assert onnx_file.exists() and onnx_file.parent == result.record("export").directory
    latency = json.loads((result.record("profile").directory / "latency.json").read_text())
    assert [b["batch_size"] for b in latency["batches"]] == [1, 4]
    profile = result.record("profile").metrics
    assert 0 < profile["median_ms"] <= profile["p90_ms"] <= profile["p99_ms"]
    on_onnx, on_torch = result.record("eval_onnx").metrics, result.record("eval").metrics
    assert on_onnx["backend"] == "onnx" and on_onnx["accuracy"] == on_torch["accuracy"]
    report = (tmp_path / "report.md").read_text()
    assert "| `export` | `export.onnx` | ran |" in report
    # accuracy (from the onnxruntime eval of that file) and latency joined per exported file
    assert re.search(r"\| prune → export \| \d+\.\d+% \| \d+\.\d+ \|", report)
    assert result.record("profile").onnx_source == "export"


def test_export_failure_names_the_op_and_leaves_nothing(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["model"] = {"factory": "tests.factories:no_onnx_op"}
    tiny_recipe["stages"] = [{"id": "export", "uses": "export.onnx"}]
    with pytest.raises(StageFailed, match="linalg_inv") as info:
        slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    assert "'export'" in str(info.value) and "inverse" in str(info.value)
    assert not list((tmp_path / "stages").iterdir())


def test_progress_off_a_tty_prints_plain_lines() -> None:
    stream = io.StringIO()
    with Progress(30, "train: epochs", stream=stream) as bar:
        for _ in range(30):
            bar.update(1, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert 10 <= len(lines) <= 12 and lines[-1].strip().startswith("train: epochs 30/30 (100%)")


def test_readme_python_example_runs(tmp_path: Path, monkeypatch) -> None:
    """The README's Python block is real code: run it as written (it runs the quickstart)."""
    root = Path(__file__).parent.parent
    text = (root / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "quickstart.yaml").write_text(
        (root / "recipes" / "quickstart.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    report = (tmp_path / "runs" / "quickstart" / "report.md").read_text()
    assert "profile_pruned" in report and (tmp_path / "runs/quickstart/report.png").exists()
    assert (tmp_path / "model.onnx").exists()
