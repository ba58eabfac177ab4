"""PDP vs gradual magnitude pruning vs one-shot magnitude + fine-tune, at equal epochs.

    python bench/bench_pdp.py [--seeds 0 1 2] [--pretrain 10] [--epochs 10]

Every method starts from the same dense model (trained ``--pretrain`` epochs) and trains
``--epochs`` more with the same optimizer and schedule; reported: test accuracy after the hard
masks. Writes bench/out/pdp.json + pdp.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench.common import markdown_table, save
from compress.prune.magnitude import apply_masks, magnitude_masks
from compress.prune.nm import nm_masks
from slimline.data import load_dataset
from slimline.evaluation import accuracy, predict
from slimline.models import build_model
from slimline.stages.prune_pdp import PDPParams, train_pdp
from slimline.training import TrainParams, fit

SETUPS = [("resnet", "digits", {"depth": 8, "width": 16}), ("cnn1d", "mnist1d", {})]
TARGETS = ["0.9", "0.95", "2:4"]
RAMP_EPOCHS = 3  # PDP and gradual magnitude reach the target 3 epochs after the warm-up


def _masks_for(model: torch.nn.Module, target: str, sparsity: float) -> dict:
    if target == "2:4":
        return nm_masks(model, 2, 4, on_indivisible="skip").masks
    return magnitude_masks(model, sparsity, "global")


def gradual_magnitude(model, data, target: str, epochs: int, warmup: int, seed: int) -> None:
    """Magnitude masks recomputed every epoch after ``warmup`` at a linearly ramped sparsity
    (N:M: the final pattern from the end of the warm-up on)."""
    final = 0.5 if target == "2:4" else float(target)
    masks: dict = {}
    ramp = RAMP_EPOCHS

    def on_epoch(epoch: int) -> None:
        if epoch < warmup:
            return
        current = final * min(1.0, (epoch - warmup + 1) / ramp)
        masks.clear()
        masks.update(_masks_for(model, target, current))
        apply_masks(model, masks)

    fit(model, data, TrainParams(epochs=epochs, lr=2e-3), masks=masks, seed=seed, on_epoch=on_epoch)
    masks.update(_masks_for(model, target, final))
    apply_masks(model, masks)


def one_shot(model, data, target: str, epochs: int, seed: int) -> None:
    masks = _masks_for(model, target, 0.5 if target == "2:4" else float(target))
    apply_masks(model, masks)
    fit(model, data, TrainParams(epochs=epochs, lr=2e-3), masks=masks, seed=seed)


def pdp(model, data, target: str, epochs: int, warmup: int, seed: int) -> None:
    if target == "2:4":
        p = PDPParams(method="nm", n=2, m=4, epochs=epochs, warmup_epochs=warmup, tau=0.2)
    else:
        sparsity = float(target)
        p = PDPParams(
            sparsity=sparsity,
            epochs=epochs,
            warmup_epochs=warmup,
            epsilon=sparsity / RAMP_EPOCHS,
            tau=0.2,
        )
    train_pdp(model, data, p, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: list[dict] = []
    for model_name, data_name, kwargs in SETUPS:
        data = load_dataset(data_name)
        shape = tuple(data.x_train.shape[1:])
        for seed in args.seeds:
            torch.manual_seed(seed)
            dense = build_model(
                model_name,
                num_classes=data.num_classes,
                in_channels=shape[0],
                input_size=shape[1:],
                **kwargs,
            )
            fit(dense, data, TrainParams(epochs=args.pretrain), seed=seed)
            dense_acc = accuracy(predict(dense, data.x_test), data.y_test)
            for target in TARGETS:
                for method in ("pdp", "gradual_magnitude", "one_shot_finetune"):
                    model = copy.deepcopy(dense)
                    torch.manual_seed(seed)
                    start = time.perf_counter()
                    if method == "pdp":
                        pdp(model, data, target, args.epochs, args.warmup, seed)
                    elif method == "gradual_magnitude":
                        gradual_magnitude(model, data, target, args.epochs, args.warmup, seed)
                    else:
                        one_shot(model, data, target, args.epochs, seed)
                    results.append(
                        {
                            "model": model_name,
                            "data": data_name,
                            "seed": seed,
                            "target": target,
                            "method": method,
                            "dense_accuracy": dense_acc,
                            "accuracy": accuracy(predict(model, data.x_test), data.y_test),
                            "seconds": time.perf_counter() - start,
                        }
                    )
                    print(results[-1], flush=True)
    rows = []
    for model_name, data_name, _ in SETUPS:
        for target in TARGETS:
            row: list = [f"{model_name}/{data_name}", target]
            for method in ("pdp", "gradual_magnitude", "one_shot_finetune"):
                accs = [
                    r["accuracy"]
                    for r in results
                    if r["model"] == model_name and r["target"] == target and r["method"] == method
                ]
                spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
                row.append(f"{statistics.mean(accs):.4f}{spread}")
            rows.append(row)
    table = markdown_table(
        ["model/data", "target", "PDP", "gradual magnitude", "one-shot + fine-tune"], rows
    )
    header = (
        f"Test accuracy, seeds {args.seeds}, dense pretrain {args.pretrain} epochs, then "
        f"{args.epochs} epochs per method (warm-up {args.warmup}).\n\n"
    )
    save("pdp", {"args": vars(args), "results": results}, header + table)


if __name__ == "__main__":
    main()
