"""Our int8 QDQ export vs fp32 and vs onnxruntime's own static int8 quantization, per target.

    python -m bench.bench_int8                    # all configurations
    python -m bench.bench_int8 --configs resnet-8x8,vit-32x32

Every figure is for the CPU running the benchmark; its model and ISA flags are in the output
(``machine``), and the int8 files are quantized for it (recipe ``target: auto``, see
:mod:`slimline.export.target`). Two more files show what the target choice is worth here: ours
quantized for full-range ``x86-vnni`` weights and onnxruntime's static int8 without
``reduce_range``; on a CPU without VNNI both are computed wrongly (their accuracy column shows
by how much), on a VNNI CPU they equal the others.

For each configuration the pipeline trains the model (``train`` stage), quantizes it
(``quant.rtn``: int8 per-channel weights, uint8 min/max activations, BN folded) and exports
fp32 and int8 QDQ ONNX (``export.onnx``); run directories are cached under
``bench/out/int8_runs/``, so a re-run only re-measures. Then, with onnxruntime on one thread:

* latency at batch 1 and 32 (:func:`slimline.export.latency.profile_onnx`), fp32 / ours / ORT static,
  measured in ROUNDS interleaved rounds (A B C A B C ...), keeping each model's lowest median:
  the machine is shared, and the least disturbed round is the best estimate of the unloaded
  latency (a single round mostly measures the neighbours);
* paired ratios: the three models' runs interleaved one by one, median of per-run ratios
  (robust to the load drifting between the rounds above);
* accuracy on the test split, run by onnxruntime (fp32, ours, ORT static);
* ORT static = :func:`slimline.export.ort_quant.ort_quantize` (QDQ, per-channel, uint8/int8) on
  the same fp32 file with 256 calibration inputs, with its best settings for this CPU:
  ``reduce_range`` as this CPU needs, min/max or percentile calibration, whichever scores better
  on the validation split.

Configurations: the reference settings (digits 8x8: ResNet-8 width 16, ViT dim 64) where one
inference is far below a millisecond and fixed per-op costs dominate, and larger ones (digits
resized to 32x32: ResNet-8 width 32 and 64, ViT with 4x4 patches) where the convolutions and
matmuls carry the time and int8 kernels can show what they are worth.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

import slimline
from bench.common import OUT, markdown_table, save
from slimline.data import load_dataset
from slimline.export.int8numerics import exact_on
from slimline.export.latency import profile_onnx
from slimline.export.machine import machine_info
from slimline.export.qdq_inspect import FLOAT_KERNEL_OPS, INT8_KERNEL_OPS, ort_optimized_op_counts
from slimline.export.target import resolve_target
from slimline.runner import RunResult

CONFIGS: dict[str, dict[str, Any]] = {
    "resnet-8x8": {
        "model": {"name": "resnet", "with": {"depth": 8, "width": 16}},
        "data": {"name": "digits"},
        "epochs": 15,
    },
    "resnet-32x32": {
        "model": {"name": "resnet", "with": {"depth": 8, "width": 32}},
        "data": {"name": "digits", "with": {"resize": 32}},
        "epochs": 10,
    },
    # Width 64: enough work per conv for int8 kernels to reach ~3x (latency-only probe, untrained:
    # 2.7x at batch 1, 3.2x at 32; width 16: 1.1-1.3x). 4 epochs reach ~99% on 32x32 digits.
    "resnet-w64-32x32": {
        "model": {"name": "resnet", "with": {"depth": 8, "width": 64}},
        "data": {"name": "digits", "with": {"resize": 32}},
        "epochs": 4,
    },
    "resnet-w16-32x32": {
        "model": {"name": "resnet", "with": {"depth": 8, "width": 16}},
        "data": {"name": "digits", "with": {"resize": 32}},
        "epochs": 6,
    },
    "mobilenetv2-32x32": {
        "model": {"name": "mobilenetv2"},
        "data": {"name": "digits", "with": {"resize": 32}},
        "epochs": 10,
    },
    "vit-8x8": {"model": {"name": "vit"}, "data": {"name": "digits"}, "epochs": 40},
    "vit-32x32": {
        "model": {"name": "vit", "with": {"patch_size": 4}},
        "data": {"name": "digits", "with": {"resize": 32}},
        "epochs": 40,
    },
}
BATCHES = (1, 32)
HERE = resolve_target("auto")
ROUNDS = 5


def pipeline(name: str, config: dict[str, Any], target: str = "auto") -> RunResult:
    recipe = {
        "name": f"int8-{name}",
        "seed": 0,
        "target": target,
        "model": config["model"],
        "data": config["data"],
        "stages": [
            {"id": "train", "uses": "train", "with": {"epochs": config["epochs"]}},
            {"id": "quant", "uses": "quant.rtn", "with": {"calibration_samples": 256}},
            {"id": "export_fp32", "uses": "export.onnx", "needs": ["train"]},
            {
                "id": "export_int8",
                "uses": "export.onnx",
                "needs": ["quant"],
                "with": {"format": "int8", "parity_samples": 256},
            },
        ],
    }
    return slimline.run(recipe, run_dir=OUT / "int8_runs" / name, progress=False)


def ort_static(fp32: Path, out: Path, calibration: np.ndarray, *, reduce_range: bool,
               method: str = "minmax") -> Path:
    from slimline.export.ort_quant import ort_quantize

    return ort_quantize(fp32, out, calibration=calibration, mode="static", per_channel=True,
                        reduce_range=reduce_range, calibrate_method=method)  # type: ignore[arg-type]


def ort_best(fp32: Path, folder: Path, calibration: np.ndarray, val: tuple[np.ndarray, np.ndarray]
             ) -> tuple[Path, dict[str, Any]]:
    """onnxruntime's static int8 with the best settings for this CPU: reduce_range when it lacks
    VNNI, and the calibration method that scores better on the validation split."""
    reduce_range = HERE.scheme.reduce_range
    scored = {}
    for method in ("minmax", "percentile"):
        path = ort_static(fp32, folder / f"ort_static_{method}.onnx", calibration,
                          reduce_range=reduce_range, method=method)
        scored[method] = (accuracy(path, *val), path)
    method = max(scored, key=lambda m: scored[m][0])
    return scored[method][1], {"reduce_range": reduce_range, "calibrate_method": method,
                               "val_accuracy": {m: a for m, (a, _) in scored.items()}}


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate(
        [session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    )
    return float((logits.argmax(1) == y).mean())


def latency(paths: dict[str, Path], runs: int) -> dict[str, dict[int, float]]:
    """Median ms per model and batch: the lowest of ROUNDS interleaved rounds."""
    best: dict[str, dict[int, float]] = {k: {} for k in paths}
    for _ in range(ROUNDS):
        for key, path in paths.items():
            report = profile_onnx(
                path,
                batch_sizes=BATCHES,
                warmup=20,
                runs=runs,
                intra_op_threads=1,
                inter_op_threads=1,
            )
            for b in report.batches:
                best[key][b.batch_size] = min(
                    best[key].get(b.batch_size, float("inf")), b.median_ms
                )
    return best


def paired(paths: dict[str, Path], runs: int) -> dict[str, Any]:
    """Median ms of each model and median per-run ratios, the models' runs interleaved
    (A B C A B C ...) on one thread each: neighbours' load hits all models alike, so the ratios
    stay meaningful on a busy machine even when the absolute times do not."""
    import onnxruntime as ort

    sessions = {}
    for key, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = sessions["fp32"].get_inputs()[0]
    out: dict[str, Any] = {}
    for batch in BATCHES:
        x = np.random.default_rng(0).standard_normal((batch, *feed.shape[1:]), np.float32)
        times: dict[str, list[float]] = {key: [] for key in sessions}
        for _ in range(10):
            for session in sessions.values():
                session.run(None, {feed.name: x})
        for _ in range(runs):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {feed.name: x})
                times[key].append((time.perf_counter() - start) * 1e3)
        t = {key: np.asarray(v) for key, v in times.items()}
        out[str(batch)] = {
            "median_ms": {key: float(np.median(v)) for key, v in t.items()},
            "fp32_over_ours": float(np.median(t["fp32"] / t["ours"])),
            "ours_over_ort": float(np.median(t["ours"] / t["ort"])),
        }
    return out


def measure(name: str, config: dict[str, Any]) -> dict[str, Any]:
    result = pipeline(name, config)
    full_range = pipeline(name, config, target="x86-vnni")  # training is cached
    directory = result.record("export_int8").directory
    paths = {
        "fp32": result.record("export_fp32").directory / "model.onnx",
        "ours": directory / "model.onnx",
    }
    data = load_dataset(config["data"]["name"], **copy.deepcopy(config["data"].get("with", {})))
    calibration = data.calibration(256).numpy()
    folder = OUT / "int8_runs" / name
    val = tuple(t.numpy() for t in data.split("val"))
    paths["ort"], ort_settings = ort_best(paths["fp32"], folder, calibration, val)
    x, y = (t.numpy() for t in data.split("test"))
    # What the target choice is worth on this CPU: full-range files, run by its kernels.
    wrong = {
        "ours_full_range": full_range.record("export_int8").directory / "model.onnx",
        "ort_no_reduce_range": ort_static(paths["fp32"], folder / "ort_full_range.onnx",
                                          calibration, reduce_range=False,
                                          method=ort_settings["calibrate_method"]),
    }
    heavy = "32x32" in name  # tens of ms per batch-32 run: fewer runs
    times = latency(paths, runs=40 if heavy else 500)
    pairs = paired(paths, runs=60 if heavy else 2000)
    kernels = {}
    for key in ("ours", "ort"):
        ops = ort_optimized_op_counts(paths[key])
        kernels[key] = {
            "int8": {k: v for k, v in ops.items() if k in INT8_KERNEL_OPS},
            "float": {k: v for k, v in ops.items() if k in FLOAT_KERNEL_OPS},
        }
    export = result.record("export_int8").metrics
    return {
        "config": config,
        "target": HERE.name,
        "weight_bits_used": result.record("quant").metrics["weight_bits_used"],
        "ort_settings": ort_settings,
        "latency_ms": times,
        "paired": pairs,
        "accuracy": {key: accuracy(path, x, y) for key, path in {**paths, **wrong}.items()},
        "exact_here": {key: exact_on(path) for key, path in {**paths, **wrong}.items()},
        "bytes": {key: path.stat().st_size for key, path in paths.items()},
        "kernels": kernels,
        "ours_vs_torch": {
            "top1_agreement": export["top1_agreement"],
            "max_abs_diff": export["max_abs_diff"],
            "max_rel_diff": export["max_rel_diff"],
            "samples": export["parity_samples"],
        },
    }


def tables(results: dict[str, dict[str, Any]]) -> str:
    speed_rows, accuracy_rows, target_rows = [], [], []
    for name, r in results.items():
        t = r["latency_ms"]
        for b in BATCHES:
            fp32, ours, ort = t["fp32"][b], t["ours"][b], t["ort"][b]
            pair = r["paired"][str(b)]
            speed_rows.append(
                [
                    name,
                    b,
                    round(fp32, 4),
                    round(ours, 4),
                    f"{fp32 / ours:.2f}x",
                    round(ort, 4),
                    f"{ours / ort:.2f}",
                    f"{pair['fp32_over_ours']:.2f}x",
                    f"{pair['ours_over_ort']:.2f}",
                ]
            )
        a = r["accuracy"]
        unfused = sum(r["kernels"]["ours"]["float"].values())
        accuracy_rows.append(
            [
                name,
                f"{100 * a['fp32']:.2f}",
                f"{100 * a['ours']:.2f}",
                f"{100 * (a['ours'] - a['fp32']):+.2f}",
                f"{100 * a['ort']:.2f}",
                f"{100 * (a['ort'] - a['fp32']):+.2f}",
                f"{r['ours_vs_torch']['top1_agreement']:.4f}",
                f"{r['ours_vs_torch']['max_rel_diff']:.2e}",
                f"{r['bytes']['fp32'] // 1024} / {r['bytes']['ours'] // 1024} / "
                f"{r['bytes']['ort'] // 1024}",
                unfused,
            ]
        )
        target_rows.append(
            [
                name,
                f"{100 * (a['ours'] - a['fp32']):+.2f}",
                f"{100 * (a['ours_full_range'] - a['fp32']):+.2f}",
                f"{100 * (a['ort'] - a['fp32']):+.2f}",
                f"{100 * (a['ort_no_reduce_range'] - a['fp32']):+.2f}",
                "yes" if r["exact_here"]["ours_full_range"] else "no",
                f"{r['ort_settings']['calibrate_method']}, reduce_range "
                f"{r['ort_settings']['reduce_range']}",
            ]
        )
    machine = machine_info()
    return "\n\n".join(
        [
            f"Machine: {machine['cpu']} ({machine['arch']}), ISA flags "
            f"{', '.join(machine['isa_flags']) or 'none'}; target `{HERE.name}`: "
            f"{HERE.scheme.reason}.",
            f"## int8 QDQ latency (onnxruntime CPU, 1 thread, median ms, lowest of {ROUNDS} "
            "interleaved rounds; measured under load)\n\nms columns: `profile_onnx`. Paired "
            "columns: median of per-run ratios with the three models' runs interleaved "
            "(A B C A B C ...), so the neighbours' load hits all three alike.",
            markdown_table(
                [
                    "config",
                    "batch",
                    "fp32",
                    "ours int8",
                    "fp32/ours",
                    "ORT static int8",
                    "ours/ORT",
                    "paired fp32/ours",
                    "paired ours/ORT",
                ],
                speed_rows,
            ),
            "## Accuracy (test split, run by onnxruntime) and fidelity",
            markdown_table(
                [
                    "config",
                    "fp32 %",
                    "ours %",
                    "Δ pts",
                    "ORT static %",
                    "Δ pts",
                    "ours vs torch fake-quant top-1",
                    "max |Δlogit| / max|logit|",
                    "KiB fp32 / ours / ORT",
                    "float convs/matmuls left (ours)",
                ],
                accuracy_rows,
            ),
            "## What the target choice is worth here (accuracy change vs fp32, points; files run "
            "by this CPU's fused kernels)",
            markdown_table(
                [
                    "config",
                    f"ours, target {HERE.name}",
                    "ours, full-range (x86-vnni)",
                    "ORT static, best here",
                    "ORT static, no reduce_range",
                    "full-range exact here?",
                    "ORT best settings",
                ],
                target_rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {', '.join(CONFIGS)}",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    results = {name: measure(name, CONFIGS[name]) for name in names}
    save("int8", {"machine": machine_info(), "target": HERE.to_dict(), "results": results},
         tables(results))


if __name__ == "__main__":
    main()
