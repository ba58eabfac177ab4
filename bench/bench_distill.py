"""Distillation losses head to head: a trained teacher, a small student, short training.

Student test accuracy (mean ± std over seeds) with cross-entropy only vs Hinton KD, DIST,
Sinkhorn KD (SinKD), FitNets hints and the DisWOT terms, plus the student's top-1 agreement
with the teacher. Every method adds its term to CE with weight 1 (``slimline.search.distill``).

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.bench_distill --dataset digits
    OMP_NUM_THREADS=1 nice -n 10 python -m bench.bench_distill --dataset mnist1d

Writes bench/out/distill_<dataset>[<tag>].json|md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.common import markdown_table, save
from slimline.compress.prune.flops import count_params
from slimline.data import Dataset, load_dataset
from slimline.evaluation import accuracy, predict
from slimline.models import build_model
from slimline.search.distill import DistillLossConfig, make_distill_loss
from slimline.training import TrainParams, fit

# dataset -> (teacher spec, student spec, layer tapped by hints in both models)
SETUPS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "digits": ({"name": "resnet", "depth": 14, "width": 16},
               {"name": "resnet", "depth": 8, "width": 4}, "layer3"),
    "mnist1d": ({"name": "cnn1d", "channels": [32, 64, 64]},
                {"name": "cnn1d", "channels": [8, 16, 16]}, "features"),
}

# method -> DistillLossConfig keywords (None: plain cross-entropy)
METHODS: dict[str, dict[str, Any] | None] = {
    "ce": None,
    "kd": {"loss": "kd", "temperature": 4.0},
    "kd_t1": {"loss": "kd", "temperature": 1.0},
    "dist": {"loss": "dist", "temperature": 4.0},
    "sinkhorn": {"loss": "sinkhorn", "temperature": 2.0},
    "hint": {"loss": "hint"},
    "hint+kd": {"loss": "hint", "kd_weight": 1.0},
    "diswot": {"loss": "diswot"},
    "diswot+kd": {"loss": "diswot", "kd_weight": 1.0},
}


def build(spec: dict[str, Any], data: Dataset, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return build_model(spec["name"], num_classes=data.num_classes, in_channels=data.in_channels,
                       input_size=data.input_size, **kwargs)


def train_student(method: str, teacher: torch.nn.Module, data: Dataset, spec: dict[str, Any],
                  layer: str, seed: int, epochs: int) -> dict[str, float]:
    student = build(spec, data, seed)
    params = TrainParams(epochs=epochs, lr=3e-3)
    options = METHODS[method]
    started = time.perf_counter()
    if options is None:
        fit(student, data, params, seed=seed)
    else:
        if options["loss"] == "hint":
            options = {**options, "student_layer": layer, "teacher_layer": layer}
        loss = make_distill_loss(DistillLossConfig(**options), teacher, student, data.x_train[:8])
        fit(loss.trainee, data, params, seed=seed, loss_fn=loss)
    seconds = time.perf_counter() - started
    logits, teacher_logits = predict(student, data.x_test), predict(teacher, data.x_test)
    return {"test_accuracy": accuracy(logits, data.y_test),
            "agreement": float((logits.argmax(1) == teacher_logits.argmax(1)).float().mean()),
            "seconds": seconds}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SETUPS), default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--tag", default="", help="suffix of the output name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    teacher_spec, student_spec, layer = SETUPS[args.dataset]
    teacher = build(teacher_spec, data, seed=0)
    fit(teacher, data, TrainParams(epochs=args.teacher_epochs), seed=0)
    teacher.eval()
    teacher_accuracy = accuracy(predict(teacher, data.x_test), data.y_test)
    results: dict[str, list[dict[str, float]]] = {}
    for method in args.methods:
        results[method] = [train_student(method, teacher, data, student_spec, layer, seed,
                                         args.epochs) for seed in range(args.seeds)]
        accs = [100 * r["test_accuracy"] for r in results[method]]
        print(f"{method}: {' '.join(f'{a:.2f}' for a in accs)}", flush=True)
    rows = []
    baseline = results.get("ce")
    for method, runs in results.items():
        acc = mean_std([100 * r["test_accuracy"] for r in runs])
        agree = mean_std([100 * r["agreement"] for r in runs])
        seconds = statistics.mean(r["seconds"] for r in runs)
        # same seed = same init and batch order for every method, so per-seed differences
        # remove most of the seed-to-seed spread
        delta = mean_std([100 * (r["test_accuracy"] - b["test_accuracy"])
                          for r, b in zip(runs, baseline)]) if baseline else (0.0, 0.0)
        rows.append([method, f"{acc[0]:.2f} ± {acc[1]:.2f}", f"{delta[0]:+.2f} ± {delta[1]:.2f}",
                     f"{agree[0]:.1f} ± {agree[1]:.1f}", f"{seconds:.1f}"])
    student_params = count_params(build(student_spec, data, 0))
    header = (f"Teacher {teacher_spec} ({count_params(teacher)} params, "
              f"{args.teacher_epochs} epochs): test accuracy {100 * teacher_accuracy:.2f}%. "
              f"Student {student_spec} ({student_params} params), {args.epochs} epochs, "
              f"seeds 0..{args.seeds - 1}; hint layer `{layer}`.")
    table = markdown_table(["method", "student test acc (%)", "paired Δ vs ce (pp)",
                            "top-1 agreement w/ teacher (%)", "train s/run"], rows)
    save(f"distill_{args.dataset}{args.tag}",
         {"dataset": args.dataset, "teacher": teacher_spec, "student": student_spec,
          "teacher_test_accuracy": teacher_accuracy, "teacher_params": count_params(teacher),
          "student_params": student_params, "epochs": args.epochs,
          "teacher_epochs": args.teacher_epochs, "seeds": args.seeds, "methods": METHODS,
          "results": results},
         f"### Distillation losses on {args.dataset}\n\n{header}\n\n{table}")


if __name__ == "__main__":
    main()
