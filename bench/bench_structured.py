"""Structured pruning: FLOPs vs measured onnxruntime latency, and accuracy vs Torch-Pruning.

    python -m bench.bench_structured                    # all settings (15-25 min, 2 shared cores)
    python -m bench.bench_structured --settings small --rounds 3

Settings: ``small`` is the reference ResNet (depth 8, width 16) on 8x8 digits; ``large`` is 2x
wider on digits resized to 32x32 (64x the FLOPs); ``xlarge`` (width 64, 32x32, latency only, not
trained) shows where per-call overhead stops mattering. Per setting a base model is trained once,
then pruned to equal FLOPs by:

* ``ours-uniform``: :func:`prune_channels` removing 30% / 50% of every group's channels (this
  defines the FLOPs target of the row group);
* ``ours-global`` / ``ours-dp``: the same FLOPs by global ranking / the DP allocator, and
  ``ours-global-r8`` / ``-r16`` with ``round_to`` 8 / 16 (SIMD-friendly widths);
* ``tp-local`` / ``tp-global``: ``tp.pruner.MagnitudePruner`` (group L2 importance), its
  ``pruning_ratio`` bisected until its FLOPs match (within 1%, never above).

Latency: ONNX Runtime, 1 intra-op thread, batch 1 and 32. The machine is shared, so each run is
timed by the CPU time of the calling thread (onnxruntime computes on it with one thread; time
the OS gives to other processes is not counted), models are timed in interleaved rounds and the
fastest round's median is kept. ``efficiency`` = FLOPs ratio / latency ratio: 1.0 means the
measured speed-up reaches the FLOPs limit. Accuracy: test split, before and after a short
fine-tune (same schedule for every method).
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from bench.common import markdown_table, save
from slimline.compress.prune.flops import count_flops
from slimline.compress.prune.structured import StructuredPruningError, prune_channels
from slimline.data import Dataset, load_dataset
from slimline.export import export_onnx
from slimline.models import build_model

SETTINGS: dict[str, dict[str, Any]] = {
    "small": {
        "data": {},
        "model": {"depth": 8, "width": 16},
        "epochs": 15,
        "finetune": 3,
        "runs": {1: 300, 32: 60},
    },
    "large": {
        "data": {"resize": 32},
        "model": {"depth": 8, "width": 32},
        "epochs": 6,
        "finetune": 2,
        "runs": {1: 100, 32: 12},
    },
    "xlarge": {
        "data": {"resize": 32},
        "model": {"depth": 8, "width": 64},
        "epochs": 0,
        "finetune": 0,
        "runs": {1: 40, 32: 5},
    },
}
RATIOS = (0.3, 0.5)


def train(model: nn.Module, data: Dataset, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    """AdamW with linear warm-up (one epoch at most) and cosine decay, batch 64."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(data.x_train) / 64)
    warmup = min(steps // 4, math.ceil(len(data.x_train) / 64))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(
            (s + 1) / max(warmup, 1), 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
        ),
    )
    for epoch in range(epochs):
        model.train()
        for x, y in data.batches("train", 64, shuffle=True, seed=seed + epoch):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset) -> float:
    model.eval()
    x, y = data.split("test")
    return float((model(x).argmax(1) == y).float().mean())


def flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    return count_flops(model, torch.zeros(1, *shape)).total


def tp_prune(
    base: nn.Module, shape: tuple[int, ...], target_flops: int, global_pruning: bool
) -> nn.Module:
    """Torch-Pruning's MagnitudePruner with its ratio bisected to ``target_flops`` (within 1%)."""
    low, high, best = 0.0, 0.95, None
    for _ in range(20):
        ratio = (low + high) / 2
        model = copy.deepcopy(base)
        pruner = tp.pruner.MagnitudePruner(
            model,
            torch.zeros(1, *shape),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            ignored_layers=[model.fc],
        )
        pruner.step()
        count = flops(model, shape)
        if count <= target_flops:
            high, best = ratio, model
            if count >= 0.99 * target_flops:
                break
        else:
            low = ratio
    assert best is not None
    return best.eval()


def pruned_models(base: nn.Module, shape: tuple[int, ...], ratio: float) -> dict[str, Any]:
    """Every method at the FLOPs of ours-uniform at ``ratio`` of the channels."""
    x = torch.zeros(1, *shape)
    models: dict[str, Any] = {}
    uniform = copy.deepcopy(base)
    result = prune_channels(uniform, x, ratio)
    models["ours-uniform"] = uniform.eval()
    flops_ratio = result.flops_ratio
    for name, kwargs in (
        ("ours-global", {"allocation": "global"}),
        ("ours-dp", {"allocation": "dp"}),
        ("ours-global-r8", {"allocation": "global", "round_to": 8}),
        ("ours-global-r16", {"allocation": "global", "round_to": 16}),
    ):
        model = copy.deepcopy(base)
        try:
            prune_channels(model, x, 1 - flops_ratio, target="flops", **kwargs)
        except StructuredPruningError as exc:  # e.g. width-16 groups cannot shrink at round_to 16
            print(f"  {name} at FLOPs x{flops_ratio:.3f}: {exc}", flush=True)
            continue
        models[name] = model.eval()
    target = flops(uniform, shape)
    models["tp-local"] = tp_prune(base, shape, target, global_pruning=False)
    models["tp-global"] = tp_prune(base, shape, target, global_pruning=True)
    return models


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies(
    paths: dict[int, Path], shape: tuple[int, ...], rounds: int, runs: dict[int, int]
) -> dict[int, dict[str, float]]:
    """Per model: fastest-round median thread-CPU ms (``cpu_b{B}``) and wall ms (``wall_b{B}``)."""
    sessions = {i: _session(path) for i, path in paths.items()}
    rng = np.random.default_rng(0)
    feeds = {b: {"input": rng.standard_normal((b, *shape)).astype(np.float32)} for b in runs}
    best: dict[int, dict[str, float]] = {i: {} for i in paths}
    for _ in range(rounds):
        for i, session in sessions.items():
            for batch, count in runs.items():
                for _ in range(max(3, count // 10)):  # warm-up
                    session.run(None, feeds[batch])
                cpu, wall = [], []
                for _ in range(count):
                    c0, w0 = time.thread_time(), time.perf_counter()
                    session.run(None, feeds[batch])
                    cpu.append(time.thread_time() - c0)
                    wall.append(time.perf_counter() - w0)
                for key, values in ((f"cpu_b{batch}", cpu), (f"wall_b{batch}", wall)):
                    best[i][key] = min(best[i].get(key, math.inf), 1e3 * float(np.median(values)))
    return best


def run_setting(name: str, setting: dict[str, Any], rounds: int, out_dir: Path) -> list[dict]:
    torch.manual_seed(0)
    data = load_dataset("digits", **setting["data"])
    shape = data.input_shape
    trained = setting["epochs"] > 0
    started = time.perf_counter()
    base = build_model(
        "resnet", num_classes=10, in_channels=1, input_size=shape[1:], **setting["model"]
    ).eval()
    if trained:
        base = train(base, data, setting["epochs"], 3e-3)
    print(
        f"[{name}] base ready in {time.perf_counter() - started:.0f}s, "
        f"accuracy {accuracy(base, data):.3f}",
        flush=True,
    )
    rows = [{"setting": name, "ratio": 0.0, "method": "base", "model": base}]
    for ratio in RATIOS:
        for method, model in pruned_models(base, shape, ratio).items():
            rows.append({"setting": name, "ratio": ratio, "method": method, "model": model})
    base_flops = flops(base, shape)
    base_params = sum(p.numel() for p in base.parameters())
    paths = {}
    for i, row in enumerate(rows):
        model = row.pop("model")
        row["flops_ratio"] = flops(model, shape) / base_flops
        row["params_ratio"] = sum(p.numel() for p in model.parameters()) / base_params
        row["widths"] = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        row["accuracy"] = accuracy(model, data) if trained else None
        row["accuracy_ft"] = row["accuracy"]
        if trained and row["method"] != "base":
            row["accuracy_ft"] = accuracy(
                train(copy.deepcopy(model), data, setting["finetune"], 1e-3), data
            )
        paths[i] = export_onnx(model, torch.randn(2, *shape), out_dir / f"{name}-{i}.onnx")
    print(
        f"[{name}] {len(paths)} models pruned{' and fine-tuned' if trained else ''}; timing",
        flush=True,
    )
    timed = latencies(paths, shape, rounds, setting["runs"])
    for i, row in enumerate(rows):
        row.update(timed[i])
        for batch in setting["runs"]:
            ratio = timed[i][f"cpu_b{batch}"] / timed[0][f"cpu_b{batch}"]
            row[f"latency_ratio_b{batch}"] = ratio
            row[f"efficiency_b{batch}"] = row["flops_ratio"] / ratio
    return rows


def markdown(rows: list[dict]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    header = [
        "setting",
        "removed",
        "method",
        "FLOPs ratio",
        "params ratio",
        "latency ratio b1",
        "latency ratio b32",
        "efficiency b1",
        "efficiency b32",
        "ms b1",
        "ms b32",
        "accuracy",
        "fine-tuned",
    ]
    table = [
        [
            r["setting"],
            f"{r['ratio']:.0%}",
            r["method"],
            r["flops_ratio"],
            r["params_ratio"],
            r["latency_ratio_b1"],
            r["latency_ratio_b32"],
            r["efficiency_b1"],
            r["efficiency_b32"],
            r["cpu_b1"],
            r["cpu_b32"],
            pct(r["accuracy"]),
            pct(r["accuracy_ft"]),
        ]
        for r in rows
    ]
    return (
        "## Structured pruning: FLOPs vs onnxruntime latency, accuracy vs Torch-Pruning\n\n"
        "removed = channels removed by ours-uniform; the other methods of a row group match "
        "its FLOPs. efficiency = FLOPs ratio / latency ratio (1.0 reaches the FLOPs limit; "
        "goal >= 0.8). Latency: onnxruntime, 1 thread, thread-CPU ms, fastest of the "
        "interleaved rounds' medians, on a shared machine (noisy).\n\n"
        + markdown_table(header, table)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="small,large,xlarge")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; timings use 1 thread anyway
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            rows += run_setting(name, SETTINGS[name], args.rounds, Path(tmp))
    save("structured", {"rows": rows, "settings": SETTINGS, "ratios": list(RATIOS)}, markdown(rows))


if __name__ == "__main__":
    main()
