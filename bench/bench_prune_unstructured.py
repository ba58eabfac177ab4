"""Layer-adaptive unstructured pruning: output distortion and accuracy, no fine-tuning and after a
short fine-tune, for uniform / global magnitude / LAMP / DIMAP / rate-distortion DP.

    python -m bench.bench_prune_unstructured                     # full grid (about 30 min, 2 cores)
    python -m bench.bench_prune_unstructured --models resnet --seeds 1 --sparsities 0.5 0.9

Models: the reference ResNet (quickstart: depth 8, width 16) and the zoo ViT on digits, the zoo
CNN-1D on MNIST-1D; each trained from scratch per seed (``--train-epochs``). Every method prunes
the same candidate weights to the same number of zeros (``floor(sparsity * N)``; uniform rounds
per layer). ViT: the patch embedding and the classifier stay dense for *all* methods (DIMAP keeps
them dense by design, so this keeps the comparison at equal sparsity).

* ``dp-free``: DP on data-free inputs (BN-statistics-matched for models with BatchNorm, else
  N(0,1)); ``dp-cal``: DP on 64 training samples. Both with ``refine=3`` (see
  :mod:`slimline.compress.prune.rate_distortion`); ``dp-free-r0`` is the paper's one-shot DP (no refine).
* distortion: logit MSE vs the dense model on the **test split** (never seen by any method);
  accuracy: top-1 on the test split; ``ft``: after ``--finetune-epochs`` epochs with the masks
  kept (same schedule as the ``train`` stage).
* additivity: Pearson r between measured joint distortion and the sum of single-layer
  distortions over 64 random allocations (levels uniform in [0, max_level]).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bench.common import markdown_table, save
from slimline.compress.prune import prunable_weights
from slimline.compress.prune.allocation import (
    keep_budget,
    masks_from_counts,
    threshold_allocation,
    uniform_allocation,
)
from slimline.compress.prune.distortion import additivity, distortion_curves
from slimline.compress.prune.importance import (
    VIT_MODULES,
    DIMAPImportance,
    LAMPImportance,
    MagnitudeImportance,
    assign_modules,
)
from slimline.compress.prune.inputs import bn_matched_inputs, has_batch_norm, random_inputs
from slimline.compress.prune.magnitude import apply_masks
from slimline.compress.prune.rate_distortion import rd_allocation
from slimline.data import Dataset, load_dataset
from slimline.evaluation import accuracy, predict
from slimline.models import build_model
from slimline.training import TrainParams, fit

MODELS: dict[str, dict[str, Any]] = {
    "resnet": {
        "builder": "resnet",
        "with": {"depth": 8, "width": 16},
        "data": "digits",
        "exclude": None,
    },
    "vit": {"builder": "vit", "with": {}, "data": "digits", "exclude": r"^(patch_embed|head)\."},
    "cnn1d": {"builder": "cnn1d", "with": {}, "data": "mnist1d", "exclude": None},
}
BASELINES = ("uniform", "global", "lamp")


def logit_mse(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).pow(2).mean())


def evaluate(model: nn.Module, data: Dataset, reference: torch.Tensor) -> dict[str, float]:
    logits = predict(model, data.x_test)
    return {"distortion": logit_mse(logits, reference), "accuracy": accuracy(logits, data.y_test)}


def allocations(
    model: nn.Module,
    spec: dict[str, Any],
    sparsity: float,
    inputs: dict[str, torch.Tensor],
    curves: dict[str, Any],
    grid: np.ndarray,
) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    """Pruned counts per layer for every method at one sparsity (+ DP diagnostics)."""
    named = prunable_weights(model, exclude=spec["exclude"])
    weights = {n: w.detach() for n, w in named.items()}
    names = list(weights)
    budget = keep_budget(sum(w.numel() for w in weights.values()), sparsity)
    out = {
        "uniform": uniform_allocation(weights, sparsity),
        "global": threshold_allocation(MagnitudeImportance()(weights), sparsity),
        "lamp": threshold_allocation(LAMPImportance()(weights), sparsity),
    }
    if spec["builder"] == "vit":
        module_of = assign_modules(model, names, VIT_MODULES)
        out["dimap"] = threshold_allocation(DIMAPImportance(module_of)(weights), sparsity)
    info: dict[str, Any] = {}
    for method, kind, refine in (
        ("dp-free-r0", "free", 0),
        ("dp-free", "free", 3),
        ("dp-cal", "cal", 3),
    ):
        result = rd_allocation(
            model,
            names,
            inputs[kind],
            budget,
            levels=grid,
            refine=refine,
            max_level=0.99,
            curves=curves[kind],
        )
        out[method] = result.counts
        info[method] = {"rounds": result.rounds, "seconds": result.seconds}
    return out, info


def run_model(key: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = MODELS[key]
    data = load_dataset(spec["data"])
    torch.manual_seed(seed)
    model = build_model(
        spec["builder"],
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.input_size,
        **spec["with"],
    )
    started = time.perf_counter()
    fit(model, data, TrainParams(epochs=args.train_epochs), seed=seed)
    model.eval()
    train_s = time.perf_counter() - started
    reference = predict(model, data.x_test)
    dense = {"accuracy": accuracy(reference, data.y_test)}
    free_kind = "bn" if has_batch_norm(model) else "random"
    inputs = {
        "free": (
            bn_matched_inputs(model, data.input_shape, args.samples, seed=seed)
            if free_kind == "bn"
            else random_inputs(data.input_shape, args.samples, seed=seed)
        ),
        "cal": data.calibration(args.samples, seed=seed),
    }
    grid = np.linspace(0.0, 1.0, args.grid)
    names = list(prunable_weights(model, exclude=spec["exclude"]))
    curves, curve_s = {}, {}
    for kind, x in inputs.items():
        started = time.perf_counter()
        curves[kind] = distortion_curves(model, names, x, grid)
        curve_s[kind] = time.perf_counter() - started
    additive = {}
    for kind in inputs:
        for max_level in (0.5, 0.7, 0.9):
            check = additivity(
                model, curves[kind], inputs[kind], samples=64, max_level=max_level, seed=seed
            )
            additive[f"{kind}@{max_level}"] = check.pearson
    rows = []
    for sparsity in args.sparsities:
        counts, info = allocations(model, spec, sparsity, inputs, curves, grid)
        for method, per_layer in counts.items():
            scores = MagnitudeImportance()(
                {n: dict(model.named_parameters())[n].detach() for n in per_layer}
            )
            masks = masks_from_counts(scores, per_layer)
            pruned = copy.deepcopy(model)
            apply_masks(pruned, masks)
            row = {
                "model": key,
                "seed": seed,
                "sparsity": sparsity,
                "method": method,
                **evaluate(pruned, data, reference),
            }
            if args.finetune_epochs:
                fit(pruned, data, TrainParams(epochs=args.finetune_epochs), masks=masks, seed=seed)
                tuned = evaluate(pruned, data, reference)
                row.update({"ft_distortion": tuned["distortion"], "ft_accuracy": tuned["accuracy"]})
            row["dp"] = info.get(method)
            rows.append(row)
        print(
            f"  {key} seed {seed} sparsity {sparsity}: "
            + ", ".join(
                f"{r['method']} {r['distortion']:.3g}" for r in rows if r["sparsity"] == sparsity
            ),
            flush=True,
        )
    return {
        "model": key,
        "seed": seed,
        "dense": dense,
        "train_s": train_s,
        "curve_s": curve_s,
        "free_inputs": free_kind,
        "additivity": additive,
        "layers": len(names),
        "rows": rows,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, list[str]]:
    rows = [r for run in runs for r in run["rows"]]
    lines, misses = [], []
    for key in dict.fromkeys(r["model"] for r in rows):
        header = ["sparsity", "method", "distortion (test MSE)", "accuracy"]
        if args.finetune_epochs:
            header += ["ft distortion", "ft accuracy"]
        table = []
        dense = [run["dense"]["accuracy"] for run in runs if run["model"] == key]
        for sparsity in args.sparsities:
            subset = [r for r in rows if r["model"] == key and r["sparsity"] == sparsity]
            methods = list(dict.fromkeys(r["method"] for r in subset))
            mean = {
                m: {
                    f: statistics.mean(r[f] for r in subset if r["method"] == m)
                    for f in ("distortion", "accuracy", "ft_distortion", "ft_accuracy")
                    if f in subset[0]
                }
                for m in methods
            }
            for m in methods:
                cells = [r for r in subset if r["method"] == m]
                line = [
                    sparsity,
                    m,
                    _mean_std([c["distortion"] for c in cells]),
                    _mean_std([100 * c["accuracy"] for c in cells]),
                ]
                if args.finetune_epochs:
                    line += [
                        _mean_std([c["ft_distortion"] for c in cells]),
                        _mean_std([100 * c["ft_accuracy"] for c in cells]),
                    ]
                table.append(line)
            others = [m for m in methods if not m.startswith("dp")]
            for dp in ("dp-free", "dp-cal"):
                for phase in ("", "ft_") if args.finetune_epochs else ("",):
                    best = min(others, key=lambda m: mean[m][f"{phase}distortion"])
                    if mean[dp][f"{phase}distortion"] >= mean[best][f"{phase}distortion"]:
                        misses.append(
                            f"{key} {sparsity:.0%} {phase or 'no-ft '}{dp}: "
                            f"distortion {mean[dp][phase + 'distortion']:.4g} not "
                            f"below {best} {mean[best][phase + 'distortion']:.4g}"
                        )
                    if mean[dp][f"{phase}accuracy"] < mean["lamp"][f"{phase}accuracy"]:
                        misses.append(
                            f"{key} {sparsity:.0%} {phase or 'no-ft '}{dp}: "
                            f"accuracy {100 * mean[dp][phase + 'accuracy']:.2f}% < "
                            f"lamp {100 * mean['lamp'][phase + 'accuracy']:.2f}%"
                        )
        lines += [
            f"### {key} (dense accuracy {_mean_std([100 * d for d in dense])}%)",
            "",
            markdown_table(header, table),
            "",
        ]
    add_rows, time_rows = [], []
    for key in dict.fromkeys(run["model"] for run in runs):
        mine = [run for run in runs if run["model"] == key]
        add_rows.append(
            [key, mine[0]["free_inputs"]]
            + [
                _mean_std([run["additivity"][f"{kind}@{level}"] for run in mine])
                for kind in ("free", "cal")
                for level in (0.5, 0.7, 0.9)
            ]
        )
        dp_rows = [r["dp"] for run in mine for r in run["rows"] if r["method"] == "dp-free"]
        time_rows.append(
            [
                key,
                mine[0]["layers"],
                round(statistics.mean(r["train_s"] for r in mine), 1),
                round(statistics.mean(r["curve_s"]["free"] for r in mine), 1),
                round(statistics.mean(r["curve_s"]["cal"] for r in mine), 1),
                round(statistics.mean(d["seconds"]["refine"] for d in dp_rows), 1),
                round(1e3 * statistics.mean(d["seconds"]["dp"] for d in dp_rows), 1),
            ]
        )
    lines += [
        "### Additivity (Pearson r, joint vs summed single-layer distortion)",
        "",
        markdown_table(
            [
                "model",
                "data-free inputs",
                "free ≤0.5",
                "free ≤0.7",
                "free ≤0.9",
                "cal ≤0.5",
                "cal ≤0.7",
                "cal ≤0.9",
            ],
            add_rows,
        ),
        "",
        "### Time per seed (s)",
        "",
        markdown_table(
            [
                "model",
                "layers",
                "train",
                "curves (free)",
                "curves (cal)",
                "refine (dp-free, per sparsity)",
                "DP solve (ms)",
            ],
            time_rows,
        ),
        "",
    ]
    lines += ["### Misses (DP not strictly lowest mean distortion, or accuracy below LAMP)", ""]
    lines += [f"- {m}" for m in misses] or ["- none"]
    return "\n".join(lines), misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--grid", type=int, default=101)
    parser.add_argument("--name", default="prune_unstructured")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs = []
    for key in args.models:
        for seed in range(args.seeds):
            print(f"{key} seed {seed}", flush=True)
            runs.append(run_model(key, seed, args))
    markdown, misses = report(runs, args)
    title = (
        f"## Unstructured pruning: {', '.join(args.models)}; {args.seeds} seed(s); "
        f"grid {args.grid}; {args.samples} distortion samples; fine-tune "
        f"{args.finetune_epochs} epochs; {time.perf_counter() - started:.0f} s"
    )
    save(args.name, {"args": vars(args), "runs": runs, "misses": misses}, f"{title}\n\n{markdown}")


if __name__ == "__main__":
    main()
