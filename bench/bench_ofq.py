"""Low-bit ViT QAT on digits: LSQ vs StatsQ vs StatsQ+CGA vs StatsQ+CGA+QKR.

    python bench/bench_ofq.py [--bits 2 3 4] [--seeds 0] [--pretrain 8] [--epochs 6]

All methods start from the same float ViT; W{b}A{b} with LSQ activations; reported: test
accuracy of the final (grid) model and the final share of oscillating weights (Nagel et al.'s
moving frequency, momentum 0.05 ≈ one epoch, above 0.02) at the end; the per-epoch shares are in
the JSON (the cosine schedule drives every method towards zero at the very end). Writes bench/out/ofq.json + ofq.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench.common import markdown_table, save
from slimline.data import load_dataset
from slimline.evaluation import accuracy, predict
from slimline.models import build_model
from slimline.stages.quant_qat import QATParams, train_qat
from slimline.training import TrainParams, fit

METHODS = {
    "lsq": {"weight_quantizer": "lsq"},
    "statsq": {"weight_quantizer": "statsq"},
    "statsq+cga": {"weight_quantizer": "statsq", "cga": True},
    "statsq+cga+qkr": {"weight_quantizer": "statsq", "cga": True, "qkr": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cga-epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    results: list[dict] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense = build_model("vit", num_classes=10, in_channels=1, input_size=(8, 8))
        fit(dense, data, TrainParams(epochs=args.pretrain), seed=seed)
        float_acc = accuracy(predict(dense, data.x_test), data.y_test)
        for bits in args.bits:
            for method, options in METHODS.items():
                model = copy.deepcopy(dense)
                torch.manual_seed(seed)
                start = time.perf_counter()
                p = QATParams(
                    weight_bits=bits,
                    activation_bits=bits,
                    epochs=args.epochs,
                    cga_epochs=args.cga_epochs,
                    **options,
                )
                _, history = train_qat(model, data, p, seed=seed)
                results.append(
                    {
                        "seed": seed,
                        "bits": bits,
                        "method": method,
                        "float_accuracy": float_acc,
                        "accuracy": accuracy(predict(model, data.x_test), data.y_test),
                        "oscillation_share": history[-1]["oscillation_share"],
                        "oscillation_per_epoch": [r["oscillation_share"] for r in history],
                        "seconds": time.perf_counter() - start,
                    }
                )
                print(results[-1], flush=True)
    rows = []
    for bits in args.bits:
        for method in METHODS:
            chosen = [r for r in results if r["bits"] == bits and r["method"] == method]
            rows.append(
                [
                    f"W{bits}A{bits}",
                    method,
                    statistics.mean(r["accuracy"] for r in chosen),
                    f"{100 * statistics.mean(r['oscillation_share'] for r in chosen):.2f}%",
                ]
            )
    table = markdown_table(["bits", "method", "test accuracy", "oscillating weights"], rows)
    header = (
        f"ViT (dim 64, depth 4) on digits, seeds {args.seeds}, float pretrain "
        f"{args.pretrain} epochs (test acc {results[0]['float_accuracy']:.4f}), QAT "
        f"{args.epochs} epochs (CGA: last {args.cga_epochs}).\n\n"
    )
    save("ofq", {"args": vars(args), "results": results}, header + table)


if __name__ == "__main__":
    main()
