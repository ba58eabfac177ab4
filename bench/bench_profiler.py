"""Profiler self-check and the onnxruntime-static int8 baseline on the reference ResNet.

    python -m bench.bench_profiler
    python -m bench.bench_profiler --runs 1000 --rounds 3

1. Self-check: the same fp32 ONNX file profiled twice by :func:`slimline.export.latency.profile_onnx`
   (separate sessions, one after the other); the run-to-run spread of the median is
   ``|a - b| / min(a, b)`` per batch size. It bounds which latency differences mean anything.
2. Baseline: the reference ResNet (depth 8, width 16) trained on digits by the pipeline
   (``train`` -> ``export.onnx`` -> ``export.ort_quantize``; cached under
   ``bench/out/profiler_run/``), quantized by onnxruntime static QDQ with uint8 activations
   (the default, U8S8) and, for contrast, int8 activations (S8S8). Latency of fp32 and both
   int8 files in interleaved rounds (A B C, A B C, ...), keeping each model's lowest median
   (the machine is shared: a single round mostly measures the neighbours); accuracy on the
   test split (onnxruntime); per-op top op and the profiler's int8 diagnostics.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import slimline
from bench.common import OUT, markdown_table, save
from slimline.export.latency import LatencyReport, profile_onnx

BATCHES = (1, 32)


def pipeline(epochs: int) -> slimline.RunResult:
    recipe = {
        "name": "bench-profiler",
        "seed": 0,
        "model": {"name": "resnet", "with": {"depth": 8, "width": 16}},
        "data": {"name": "digits"},
        "stages": [
            {"id": "train", "uses": "train", "with": {"epochs": epochs}},
            {"id": "export", "uses": "export.onnx"},
            {"id": "int8_u8s8", "uses": "export.ort_quantize", "needs": ["export"]},
            {
                "id": "int8_s8s8",
                "uses": "export.ort_quantize",
                "needs": ["export"],
                "with": {"activation_type": "int8"},
            },
        ],
    }
    return slimline.run(recipe, run_dir=OUT / "profiler_run", progress=False)


def profile(path: Path, runs: int, per_op: bool = False) -> LatencyReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diagnostics are kept in report.diagnostics
        return profile_onnx(
            path, batch_sizes=BATCHES, runs=runs, warmup=50, per_op=per_op, per_op_runs=100
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="timed runs per batch size")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (baseline)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (cached)")
    args = parser.parse_args()
    result = pipeline(args.epochs)
    files = {
        "fp32": result.artifact("export").files["onnx"],
        "int8 U8S8": result.artifact("int8_u8s8").files["onnx"],
        "int8 S8S8": result.artifact("int8_s8s8").files["onnx"],
    }

    # 1. self-check
    first, second = profile(files["fp32"], args.runs), profile(files["fp32"], args.runs)
    self_rows, self_data = [], {}
    for a, b in zip(first.batches, second.batches, strict=True):
        spread = abs(a.median_ms - b.median_ms) / min(a.median_ms, b.median_ms)
        self_data[a.batch_size] = {
            "median_a_ms": a.median_ms,
            "median_b_ms": b.median_ms,
            "p90_a_ms": a.p90_ms,
            "p90_b_ms": b.p90_ms,
            "spread": spread,
        }
        self_rows.append(
            [
                a.batch_size,
                round(a.median_ms, 4),
                round(b.median_ms, 4),
                f"{100 * spread:.1f}%",
                round(a.p90_ms, 4),
                round(b.p90_ms, 4),
            ]
        )

    # 2. baseline: interleaved rounds, lowest median per model and batch size
    best: dict[str, dict[int, float]] = {name: {} for name in files}
    reports: dict[str, LatencyReport] = {}
    for round_index in range(args.rounds):
        for name, path in files.items():
            report = profile(path, args.runs, per_op=round_index == 0)
            reports.setdefault(name, report)
            for b in report.batches:
                best[name][b.batch_size] = min(best[name].get(b.batch_size, 1e9), b.median_ms)
    metrics = {
        name: result.record(stage).metrics
        for name, stage in (("int8 U8S8", "int8_u8s8"), ("int8 S8S8", "int8_s8s8"))
    }
    fp32_accuracy = metrics["int8 U8S8"]["fp32_accuracy"]
    base_rows, base_data = [], {}
    for name in files:
        top = reports[name].op_profiles[0].ops[0]
        accuracy = fp32_accuracy if name == "fp32" else metrics[name]["accuracy"]
        ratios = {bs: best[name][bs] / best["fp32"][bs] for bs in BATCHES}
        base_data[name] = {
            "best_median_ms": best[name],
            "ratio_vs_fp32": ratios,
            "accuracy": accuracy,
            "onnx_bytes": files[name].stat().st_size,
            "top_op": [top.op_type, top.share],
            "diagnostics": list(reports[name].diagnostics),
        }
        base_rows.append(
            [
                name,
                f"{100 * accuracy:.2f}%",
                f"{files[name].stat().st_size / 1024:.0f} KiB",
                *(f"{best[name][bs]:.4f} ({ratios[bs]:.2f}x)" for bs in BATCHES),
                f"{top.op_type} {100 * top.share:.0f}%",
                "yes" if reports[name].diagnostics else "-",
            ]
        )
    notes = [f"- {name}: {message}" for name in files for message in base_data[name]["diagnostics"]]
    markdown = (
        "## Profiler self-check: the same fp32 ResNet-8 profiled twice\n\n"
        + markdown_table(
            ["batch", "median A ms", "median B ms", "spread", "p90 A", "p90 B"], self_rows
        )
        + f"\n\n## onnxruntime static int8 vs fp32, ResNet-8 (width 16) on 8x8 digits "
        f"({args.rounds} interleaved rounds, lowest median)\n\n"
        + markdown_table(
            [
                "model",
                "accuracy",
                "size",
                *(f"batch {bs} ms (vs fp32)" for bs in BATCHES),
                "top op (bs 1)",
                "int8 warning",
            ],
            base_rows,
        )
        + ("\n\nProfiler int8 warnings:\n" + "\n".join(notes) if notes else "")
    )
    save(
        "bench_profiler",
        {
            "self_check": self_data,
            "baseline": base_data,
            "args": vars(args),
            "machine": first.machine,
        },
        markdown,
    )


if __name__ == "__main__":
    main()
