"""Low-bit ViT QAT on digits: LSQ vs StatsQ vs StatsQ+CGA vs StatsQ+CGA+QKR.

    python -m bench.bench_ofq [--bits 2 3 4] [--seeds 0 1 2] [--pretrain 8] [--epochs 6]
        [--boundary-range 0.02] [--methods lsq statsq statsq+cga statsq+cga+qkr]
    # seeds in parallel processes, then one table:
    python -m bench.bench_ofq --seeds 1 --name ofq_seed1   (etc.)
    python -m bench.bench_ofq --merge ofq_seed0 ofq_seed1 ofq_seed2

All methods start from the same float ViT; W{b}A{b} with LSQ activations; reported (mean ± std
over seeds): test accuracy of the final (grid) model, the share of oscillating weights (Nagel et
al.'s moving frequency, momentum 0.05 ≈ one epoch, above 0.02) at the end, and its mean over the
QAT epochs (the cosine schedule drives every method towards zero at the very end, so the final
figure alone says little); per-epoch shares are in the JSON. Writes bench/out/<name>.json + .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from bench.common import OUT, markdown_table, save
from slimline.compress.quant.qat.training import QATConfig, train_qat
from slimline.data import load_dataset
from slimline.evaluation import accuracy, predict
from slimline.models import build_model
from slimline.training import TrainParams, fit

METHODS = {
    "lsq": {"weight_quantizer": "lsq"},
    "statsq": {"weight_quantizer": "statsq"},
    "statsq+cga": {"weight_quantizer": "statsq", "cga": True},
    "statsq+cga+qkr": {"weight_quantizer": "statsq", "cga": True, "qkr": True},
}


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 4) -> str:
    mean = scale * statistics.mean(values)
    spread = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(args: dict, results: list[dict]) -> str:
    """Markdown: one row per (bits, method), mean ± std over the seeds present."""
    rows = []
    labels = list(dict.fromkeys(r["method"] for r in results))  # first-seen order
    for bits in sorted({r["bits"] for r in results}):
        for method in labels:
            chosen = [r for r in results if r["bits"] == bits and r["method"] == method]
            if not chosen:
                continue
            rows.append([
                f"W{bits}A{bits}", method, _mean_std([r["accuracy"] for r in chosen]),
                _mean_std([r["oscillation_share"] for r in chosen], 100, 2) + "%",
                _mean_std([statistics.mean(r["oscillation_per_epoch"]) for r in chosen], 100, 2)
                + "%",
            ])
    seeds = sorted({r["seed"] for r in results})
    floats = [statistics.mean(r["float_accuracy"] for r in results if r["seed"] == s)
              for s in seeds]
    header = (
        f"ViT (dim 64, depth 4) on digits, seeds {seeds}, float pretrain {args['pretrain']} "
        f"epochs (float test acc {statistics.mean(floats):.4f}), QAT {args['epochs']} epochs "
        f"(CGA: last {args['cga_epochs']}, frozen set re-chosen every step; band: the "
        "distance to a rounding boundary, in level steps, below which a weight still trains)."
        "\n\n"
    )
    return header + markdown_table(
        ["bits", "method", "test accuracy", "oscillating at end", "oscillating, mean over epochs"],
        rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cga-epochs", type=int, default=2)
    parser.add_argument("--boundary-range", type=float, default=0.02,
                        help="CGA band (level steps); the authors' scripts use 0.003-0.01")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--name", default="ofq", help="output name under bench/out")
    parser.add_argument("--merge", nargs="+", metavar="NAME",
                        help="only combine earlier outputs (e.g. one per seed) into --name")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads((OUT / f"{name}.json").read_text()) for name in args.merge]
        results = [r for part in parts for r in part["results"]]
        for r in results:  # outputs from before the band option: the default band, 0.02
            if "boundary_range" not in r and "cga" in r["method"]:
                r["boundary_range"], r["method"] = 0.02, f"{r['method']} (band 0.02)"
        settings = {k: v for k, v in parts[0]["args"].items()
                    if k not in ("seeds", "name", "boundary_range", "methods")}
        settings["seeds"] = sorted({r["seed"] for r in results})
        save(args.name, {"args": settings, "merged": args.merge, "results": results},
             table(settings, results))
        return
    torch.set_num_threads(1)
    data = load_dataset("digits")
    results: list[dict] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense = build_model("vit", num_classes=10, in_channels=1, input_size=(8, 8))
        fit(dense, data, TrainParams(epochs=args.pretrain), seed=seed)
        float_acc = accuracy(predict(dense, data.x_test), data.y_test)
        for bits in args.bits:
            for method in args.methods:
                options = METHODS[method]
                label = (f"{method} (band {args.boundary_range:g})" if options.get("cga")
                         else method)
                model = copy.deepcopy(dense)
                torch.manual_seed(seed)
                start = time.perf_counter()
                p = QATConfig(
                    weight_bits=bits,
                    activation_bits=bits,
                    epochs=args.epochs,
                    cga_epochs=args.cga_epochs,
                    boundary_range=args.boundary_range,
                    **options,
                )
                _, history = train_qat(model, data, p, seed=seed)
                results.append(
                    {
                        "seed": seed,
                        "bits": bits,
                        "method": label,
                        "boundary_range": args.boundary_range if options.get("cga") else None,
                        "float_accuracy": float_acc,
                        "accuracy": accuracy(predict(model, data.x_test), data.y_test),
                        "oscillation_share": history[-1]["oscillation_share"],
                        "oscillation_per_epoch": [r["oscillation_share"] for r in history],
                        "frozen_share_per_epoch": [r.get("frozen_share") for r in history],
                        "seconds": time.perf_counter() - start,
                    }
                )
                print(results[-1], flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("merge", "name")}
    save(args.name, {"args": settings, "results": results}, table(settings, results))


if __name__ == "__main__":
    main()
