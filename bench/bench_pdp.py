"""PDP vs gradual magnitude pruning vs one-shot magnitude + fine-tune, at equal epochs.

    python -m bench.bench_pdp [--seeds 0 1 2] [--pretrain 10] [--epochs 10] [--taus 0.05 0.1 0.2 0.4]

Every method starts from the same dense model (trained ``--pretrain`` epochs) and trains
``--epochs`` more with the same optimizer and schedule; reported: test accuracy after the hard
masks. PDP runs once per ``--taus`` value; the τ with the best mean *validation* accuracy over
all setups, targets and seeds is chosen and only its test accuracy goes into the main table (the
test split plays no part in the choice). Writes bench/out/pdp.json + pdp.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench.common import markdown_table, save
from slimline.compress.prune.magnitude import apply_masks, magnitude_masks
from slimline.compress.prune.nm import nm_masks
from slimline.compress.prune.pdp import PDPConfig, train_pdp
from slimline.data import load_dataset
from slimline.evaluation import accuracy, predict
from slimline.models import build_model
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


def pdp(model, data, target: str, epochs: int, warmup: int, seed: int, tau: float) -> None:
    if target == "2:4":
        p = PDPConfig(method="nm", n=2, m=4, epochs=epochs, warmup_epochs=warmup, tau=tau)
    else:
        sparsity = float(target)
        p = PDPConfig(
            sparsity=sparsity,
            epochs=epochs,
            warmup_epochs=warmup,
            epsilon=sparsity / RAMP_EPOCHS,
            tau=tau,
        )
    train_pdp(model, data, p, seed=seed)


METHODS = ("pdp", "gradual_magnitude", "one_shot_finetune")


def _runs(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    return [("pdp", tau) for tau in args.taus] + [
        (m, None) for m in METHODS if m != "pdp"]


def _cell(accs: list[float]) -> str:
    spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
    return f"{statistics.mean(accs):.4f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.2],
                        help="PDP temperatures to try; chosen on the validation split")
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
                for method, tau in _runs(args):
                    model = copy.deepcopy(dense)
                    torch.manual_seed(seed)
                    start = time.perf_counter()
                    if method == "pdp":
                        pdp(model, data, target, args.epochs, args.warmup, seed, tau)
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
                            "tau": tau,
                            "dense_accuracy": dense_acc,
                            "val_accuracy": accuracy(predict(model, data.x_val), data.y_val),
                            "accuracy": accuracy(predict(model, data.x_test), data.y_test),
                            "seconds": time.perf_counter() - start,
                        }
                    )
                    print(results[-1], flush=True)
    pdp_runs = [r for r in results if r["method"] == "pdp"]
    mean_val = {tau: statistics.mean(r["val_accuracy"] for r in pdp_runs if r["tau"] == tau)
                for tau in args.taus}
    chosen = max(args.taus, key=lambda tau: (mean_val[tau], -abs(tau - 0.2)))
    rows = []
    for model_name, data_name, _ in SETUPS:
        for target in TARGETS:
            row: list = [f"{model_name}/{data_name}", target]
            for method in METHODS:
                row.append(_cell([
                    r["accuracy"] for r in results
                    if r["model"] == model_name and r["target"] == target
                    and r["method"] == method and r["tau"] in (None, chosen)]))
            rows.append(row)
    table = markdown_table(
        ["model/data", "target", f"PDP (τ={chosen:g})", "gradual magnitude",
         "one-shot + fine-tune"], rows
    )
    sweep_rows = []
    for tau in args.taus:
        chosen_runs = [r for r in pdp_runs if r["tau"] == tau]
        sweep_rows.append([
            f"{tau:g}" + (" (chosen)" if tau == chosen else ""), f"{mean_val[tau]:.4f}",
            *(f"{statistics.mean(r['val_accuracy'] for r in chosen_runs if r['model'] == m):.4f}"
              for m, _, _ in SETUPS),
            f"{statistics.mean(r['accuracy'] for r in chosen_runs):.4f}"])
    sweep = markdown_table(
        ["τ", "val acc (all)", *(f"val acc {m}/{d}" for m, d, _ in SETUPS),
         "test acc (all, not used to choose)"], sweep_rows)
    header = (
        f"Test accuracy, seeds {args.seeds}, dense pretrain {args.pretrain} epochs, then "
        f"{args.epochs} epochs per method (warm-up {args.warmup}). PDP's τ chosen among "
        f"{args.taus} by mean validation accuracy over every setup, target and seed.\n\n"
    )
    save("pdp", {"args": vars(args), "chosen_tau": chosen, "mean_val_by_tau": mean_val,
                 "results": results},
         header + table + "\n\nτ sweep (PDP, mean over setups, targets and seeds):\n\n" + sweep)


if __name__ == "__main__":
    main()
