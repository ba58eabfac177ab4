"""Latency lookup table: predicted vs measured latency of held-out architectures.

    python -m bench.bench_lut                        # default digits space, 24 architectures
    python -m bench.bench_lut --space my_space.yaml --archs 40 --seed 7

Builds the table as ``slimline profile lut`` does (each distinct block exported with torch,
timed with onnxruntime on one thread, the fixed per-run overhead measured with an empty model
and subtracted), samples architectures with a seed, exports each whole
network the way the ``export.onnx`` stage does (:func:`export.export_onnx`, dynamo first), and
times blocks and networks in the same interleaved pass (the machine is shared: timing them at
different moments would compare two load levels). Reported: relative error ``(predicted - measured) / measured``
(median and p90 of its absolute value, mean signed), and the same for a naive table that sums
raw block latencies (the per-run overhead counted once per block), to show what the overhead
correction is worth. Each row also lists the network's weight bytes: past the core's L2 cache
(2 MiB here) the table, timed block by block with hot weights, predicts low.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.common import markdown_table, save
from slimline.export import export_onnx
from slimline.export.lut import interleaved_timings, load_block_sessions
from slimline.export.lut_blocks import export_space_blocks
from slimline.search.space import default_space
from slimline.search.space_loading import load_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, help="search space YAML (default: digits space)")
    parser.add_argument("--archs", type=int, default=24, help="held-out architectures (>= 20)")
    parser.add_argument("--seed", type=int, default=1, help="architecture sampling seed")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per block / network")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved passes")
    args = parser.parse_args()
    space = load_space(args.space) if args.space else default_space()

    with tempfile.TemporaryDirectory(prefix="bench-lut-") as tmp:
        started = time.perf_counter()
        export_space_blocks(space, Path(tmp) / "blocks")
        exported = time.perf_counter() - started
        loaded = load_block_sessions(Path(tmp) / "blocks")

        archs = space.sample(args.archs, seed=args.seed)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sessions, feeds = [], []
        example = torch.randn(2, space.in_channels, *space.input_size)
        for i, arch in enumerate(archs):
            torch.manual_seed(i)
            path = export_onnx(space.build_model(arch), example, Path(tmp) / f"arch{i}.onnx")
            sessions.append(
                ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            )
            feeds.append({"input": np.zeros((1, space.in_channels, *space.input_size), np.float32)})
        # Blocks and whole networks in one interleaved pass: on a shared machine the load
        # changes by the minute, and a table timed at another moment than the networks would
        # measure the neighbours, not the predictor.
        started = time.perf_counter()
        samples = interleaved_timings(
            [*loaded.sessions, *sessions],
            [*loaded.feeds, *feeds],
            runs=args.runs,
            rounds=args.rounds,
            warmup=20,
        )
        timed = time.perf_counter() - started
        count = len(loaded.sessions)
        table = loaded.table(samples[:count], warmup=20, runs=args.runs, rounds=args.rounds)
        samples = samples[count:]

    rows, results = [], []
    for arch, timings in zip(archs, samples, strict=True):
        measured = float(np.median(timings))
        keys = space.block_keys(arch)
        predicted = table.predict(keys)
        naive = sum(table.entries[k].median_ms for k in keys)
        error, naive_error = (predicted - measured) / measured, (naive - measured) / measured
        results.append(
            {
                "arch": arch.to_dict(),
                "digest": arch.digest,
                "blocks": len(keys),
                "weight_bytes": table.weight_bytes(keys),
                "measured_ms": measured,
                "predicted_ms": predicted,
                "naive_ms": naive,
                "rel_error": error,
                "naive_rel_error": naive_error,
            }
        )
        rows.append(
            [
                str(arch),
                f"{table.weight_bytes(keys) / 2**20:.2f}",
                round(measured, 4),
                round(predicted, 4),
                f"{100 * error:+.1f}%",
                f"{100 * naive_error:+.1f}%",
            ]
        )
    errors = np.abs([r["rel_error"] for r in results])
    small = np.array([r["weight_bytes"] <= 2 * 2**20 for r in results])
    naive_errors = np.abs([r["naive_rel_error"] for r in results])
    summary = {
        "architectures": len(results),
        "median_abs_rel_error": float(np.median(errors)),
        "p90_abs_rel_error": float(np.percentile(errors, 90)),
        "max_abs_rel_error": float(errors.max()),
        "mean_signed_rel_error": float(np.mean([r["rel_error"] for r in results])),
        "naive_median_abs_rel_error": float(np.median(naive_errors)),
        "median_abs_rel_error_under_2mib": float(np.median(errors[small])) if small.any() else None,
        "median_abs_rel_error_over_2mib": float(np.median(errors[~small]))
        if (~small).any()
        else None,
        "lut_entries": len(table.entries),
        "overhead_ms": table.overhead_ms,
        "lut_export_s": exported,
        "timing_s": timed,
    }
    headline = [
        ["held-out architectures", len(results)],
        ["median abs relative error", f"{100 * summary['median_abs_rel_error']:.1f}%"],
        ["p90 abs relative error", f"{100 * summary['p90_abs_rel_error']:.1f}%"],
        ["max abs relative error", f"{100 * summary['max_abs_rel_error']:.1f}%"],
        ["mean signed error (bias)", f"{100 * summary['mean_signed_rel_error']:+.1f}%"],
        ["naive sum, median abs error", f"{100 * summary['naive_median_abs_rel_error']:.1f}%"],
        [
            "median abs error, weights <= / > 2 MiB (L2)",
            " / ".join(
                "-" if v is None else f"{100 * v:.1f}%"
                for v in (
                    summary["median_abs_rel_error_under_2mib"],
                    summary["median_abs_rel_error_over_2mib"],
                )
            ),
        ],
        ["table entries / fixed overhead", f"{len(table.entries)} / {table.overhead_ms:.4f} ms"],
        ["block export / one timing pass", f"{exported:.1f} s / {timed:.1f} s (blocks + networks)"],
    ]
    markdown = (
        f"## Latency lookup table vs measured (space {space.name!r}, batch 1, 1 thread)\n\n"
        + markdown_table(["", "value"], headline)
        + "\n\n"
        + markdown_table(
            [
                "architecture",
                "weights MiB",
                "measured ms",
                "predicted ms",
                "error",
                "naive error",
            ],
            rows,
        )
    )
    save(
        "bench_lut",
        {
            "summary": summary,
            "results": results,
            "space": space.to_dict(),
            "machine": table.machine,
            "args": vars(args) | {"space": str(args.space)},
        },
        markdown,
    )


if __name__ == "__main__":
    main()
