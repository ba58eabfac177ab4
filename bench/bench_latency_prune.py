"""Latency-targeted vs FLOPs-targeted channel pruning (DP allocation), predicted vs measured.

    python -m bench.bench_latency_prune                 # ~3-6 min on 2 shared cores
    python -m bench.bench_latency_prune --runs 100 --rebuild-table

Model: the ResNet (depth 8, width 32) at 32x32 input (digits resized), **untrained** (seeded
init): this compares latency only, and the DP's output distortion is data-free. A per-layer
latency table (:func:`slimline.compress.prune.layer_latency.build_layer_latency_table`, batch 1, 1
thread, grid 4 per side) is measured once and cached in ``bench/out/latency_prune_table.json``.

For kept fractions 0.7 and 0.5 the model is pruned by ``prune_channels(allocation="dp",
round_to=8)`` with ``target="flops"`` and with ``target="latency"`` (same ratio = fraction
removed of FLOPs / of predicted latency). Every pruned model and the base are then exported and
timed together (onnxruntime, 1 thread, interleaved rounds, batch 1 and 32); ``error`` is
(predicted - measured) / measured at batch 1. The table is for batch 1, so batch 32 has no
prediction. Timings are noisy on the shared machine: compare ratios, not single milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bench.common import OUT, markdown_table, save
from slimline.compress.prune.layer_latency import (
    build_layer_latency_table,
    model_layer_widths,
    predict_model_latency,
)
from slimline.compress.prune.structured import prune_channels
from slimline.export.layer_lut import LayerLatencyTable, LutError
from slimline.export.lut import BlockFile, measure_lut, write_manifest, write_overhead_model
from slimline.export.lut_blocks import export_block
from slimline.models import build_model

KEEP = (0.7, 0.5)
TABLE = OUT / "latency_prune_table.json"


def load_or_build_table(model: nn.Module, x: torch.Tensor, rebuild: bool) -> LayerLatencyTable:
    """The cached table if it matches the model, else a freshly measured one (saved)."""
    if TABLE.is_file() and not rebuild:
        try:
            table = LayerLatencyTable.load(TABLE)
            table.check_layers(model_layer_widths(model))
            return table
        except LutError as exc:
            print(f"cached table unusable ({exc}); measuring again")
    table = build_layer_latency_table(model, x, round_to=8, grid_points=4, runs=60, rounds=10)
    table.save(TABLE)
    return table


def time_models(models: dict[str, nn.Module], shape: tuple[int, ...], runs: int) -> dict:
    """Median ms per model (overhead included), all timed in the same interleaved rounds."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        files = []
        for index, (key, model) in enumerate(models.items()):
            export_block(model, shape, folder / f"m{index}.onnx")
            files.append(BlockFile(key, f"m{index}.onnx", shape))
        overhead = write_overhead_model(folder / "overhead.onnx", shape)
        write_manifest(folder, files, overhead=overhead, batch_size=shape[0])
        table = measure_lut(folder, warmup=5, runs=runs, rounds=10, threads=1)
    return {key: entry.median_ms for key, entry in table.entries.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model, batch 1")
    parser.add_argument("--rebuild-table", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = build_model("resnet", width=32, input_size=(32, 32)).eval()
    x = torch.randn(1, 1, 32, 32)
    started = time.perf_counter()
    table = load_or_build_table(base, x, args.rebuild_table)
    table_s = time.perf_counter() - started
    base_pred = predict_model_latency(table, base)
    models: dict[str, nn.Module] = {"base": base}
    rows: list[dict[str, Any]] = []
    for keep in KEEP:
        for target in ("flops", "latency"):
            model = copy.deepcopy(base)
            result = prune_channels(
                model,
                x,
                round(1 - keep, 6),
                target=target,
                allocation="dp",
                round_to=8,
                latency_table=table if target == "latency" else None,
            )
            key = f"{target}@{keep}"
            models[key] = model.eval()
            predicted = predict_model_latency(table, model)
            rows.append(
                {
                    "keep": keep,
                    "target": target,
                    "flops_ratio": result.flops_ratio,
                    "predicted_ms": predicted,
                    "predicted_ratio": predicted / base_pred,
                    "widths": model_layer_widths(model),
                    "key": key,
                }
            )
    measured1 = time_models(models, (1, 1, 32, 32), args.runs)
    measured32 = time_models(models, (32, 1, 32, 32), max(10, args.runs // 10))
    for row in rows:
        key = row.pop("key")
        row["measured_b1_ms"] = measured1[key]
        row["measured_b1_ratio"] = measured1[key] / measured1["base"]
        row["error_b1"] = (row["predicted_ms"] - measured1[key]) / measured1[key]
        row["measured_b32_ms"] = measured32[key]
        row["measured_b32_ratio"] = measured32[key] / measured32["base"]
    base_error = (base_pred - measured1["base"]) / measured1["base"]
    header = [
        "kept", "target", "FLOPs ratio", "pred ms (b1)", "pred ratio", "meas ms (b1)",
        "meas ratio (b1)", "pred error (b1)", "meas ms (b32)", "meas ratio (b32)",
    ]  # fmt: skip
    table_rows = [
        ["1.0", "base", 1.0, base_pred, 1.0, measured1["base"], 1.0, f"{base_error:+.1%}",
         measured32["base"], 1.0],
        *[[r["keep"], r["target"], r["flops_ratio"], r["predicted_ms"], r["predicted_ratio"],
           r["measured_b1_ms"], r["measured_b1_ratio"], f"{r['error_b1']:+.1%}",
           r["measured_b32_ms"], r["measured_b32_ratio"]] for r in rows],
    ]  # fmt: skip
    markdown = "\n".join(
        [
            "## Latency-targeted channel pruning (ResNet-8 width 32, 32x32, DP, round_to=8)",
            "",
            markdown_table(header, table_rows),
            "",
            f"Per-layer table: {len(table.layers)} layers, {table.meta.get('timings')} timings "
            f"(grid {table.meta.get('grid_points')}), overhead {table.overhead_ms:.4f} ms, "
            f"{'loaded from cache' if table_s < 1 else f'measured in {table_s:.0f} s'} "
            f"({table.machine.get('cpu', '?')}). onnxruntime, 1 thread, median of interleaved "
            "runs; shared 2-core machine, so timings are noisy.",
        ]
    )
    save(
        "latency_prune",
        {
            "model": {"name": "resnet", "width": 32, "depth": 8, "input": [1, 32, 32]},
            "base": {"predicted_ms": base_pred, "b1_ms": measured1["base"]}
            | {"b32_ms": measured32["base"], "error_b1": base_error},
            "rows": rows,
            "table": {"path": str(TABLE), "meta": table.meta, "machine": table.machine},
        },
        markdown,
    )


if __name__ == "__main__":
    main()
