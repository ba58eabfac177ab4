"""Build the NAS ground-truth fixtures in tests/fixtures/nas/ (see search/groundtruth.py).

    OMP_NUM_THREADS=1 nice -n 10 python bench/build_nas_groundtruth.py digits-cnn-sgd \
        mnist1d-cnn1d-2k digits-vit mnist1d-seqformer-p4
    OMP_NUM_THREADS=1 nice -n 10 python bench/build_nas_groundtruth.py --pools digits-cnn-full

Tables (``--list`` prints them) are the leaderboard's ground truth; pools (>= 1,000 trained
architectures, ``tests/fixtures/nas/pools/``) are what RoBoT searches. Resumable: a killed run
continues where it stopped. One progress line per architecture. Parallel: run ``--shard 0/2``
and ``--shard 1/2`` side by side, then once more without ``--shard`` to merge them.

Protocol choices (why each table is built the way it is) are in PROTOCOLS below and in
bench/RESULTS.md; every choice that changes a number is stored in the fixture's header.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimline.search.groundtruth import (  # noqa: E402
    FIXTURE_DIR,
    POOL_DIR,
    GroundTruthConfig,
    build_groundtruth,
)
from slimline.training import TrainParams  # noqa: E402

# Narrow widths (4-8 channels) next to wide ones give the sample a real capacity range; with
# only wide choices every architecture reaches ~98% on digits and the ranking is noise.
# Training is 2 epochs (accuracies ~50-97%) and stage 0 has kernel 3 only: at 8x8 resolution a
# 5x5 kernel there tripled the cost of the whole fixture on a shared 2-core machine.
DIGITS_CNN_SPACE = {
    "family": "resnet_flex",
    "name": "digits-cnn",
    "input_shape": [1, 8, 8],
    "num_classes": 10,
    "stages": [
        {"widths": [4, 8, 16], "depths": [1, 2], "kernels": [3], "stride": 1},
        {"widths": [8, 16, 32], "depths": [1, 2], "kernels": [3, 5], "stride": 2},
        {"widths": [8, 16, 32, 64], "depths": [1, 2], "kernels": [1, 3], "stride": 2},
    ],
}

MNIST1D_SEQ_SPACE = {
    "family": "union",
    "name": "mnist1d-seq",
    "spaces": [
        {
            "family": "cnn1d",
            "name": "mnist1d-cnn1d",
            "input_shape": [1, 40],
            "num_classes": 10,
            "stages": [
                {"widths": [8, 16, 32], "depths": [1, 2], "kernels": [3, 5, 7]},
                {"widths": [8, 16, 32, 64], "depths": [1, 2], "kernels": [3, 5]},
                {"widths": [16, 32, 64], "depths": [1, 2], "kernels": [3, 5]},
            ],
        },
        {
            "family": "gru",
            "name": "mnist1d-gru",
            "input_shape": [1, 40],
            "num_classes": 10,
            "hidden_sizes": [8, 12, 16, 24, 32, 48, 64],
            "num_layers": [1, 2],
        },
    ],
    # A GRU run costs ~3x a 1-D CNN run here (40 sequential steps), so GRUs get fewer slots:
    # all 14 of their grid, and 26 1-D CNNs.
    "weights": [26, 14],
}

PRESETS: dict[str, GroundTruthConfig] = {
    "digits-cnn": GroundTruthConfig(
        name="digits-cnn",
        dataset="digits",
        space=DIGITS_CNN_SPACE,
        count=80,
        train=TrainParams(epochs=2, warmup_epochs=0.5),
        teacher_spec={
            "name": "resnet_flex",
            "with": {
                "widths": [32, 64, 128],
                "depths": [2, 2, 2],
                "kernels": [3, 3, 3],
                "strides": [1, 2, 2],
                "num_classes": 10,
                "in_channels": 1,
                "input_size": [8, 8],
            },
        },
        teacher_train=TrainParams(epochs=20),
    ),
    "mnist1d-seq": GroundTruthConfig(
        name="mnist1d-seq",
        dataset="mnist1d",
        space=MNIST1D_SEQ_SPACE,
        count=40,
        train=TrainParams(epochs=4, lr=1e-2, warmup_epochs=0.5),
        teacher_spec={
            "name": "cnn1d",
            "with": {
                "channels": [64, 128, 128],
                "kernel_size": 5,
                "num_classes": 10,
                "in_channels": 1,
                "input_size": [40],
            },
        },
        teacher_train=TrainParams(epochs=20, lr=1e-2),
    ),
}


# ---- issue 13: tables by other protocols (vanilla runs only, 3 seeds, >= 100 architectures) ---
# Each differs from the two tables above in at least two of: data size, epochs, optimiser,
# family, and the space's choices. Distillation is left out: the leaderboard ranks vanilla
# accuracy, and a distilled run doubles the cost. Every protocol was piloted on 20
# architectures x 2 seeds first (seed-to-seed tau must be >= 0.6, the bar).

# CNN, SGD: residual on/off and inner expansion widen the space (82,944 architectures) beyond
# width/depth, so size is not the only thing that differs. SGD with Nesterov momentum (lr 0.05)
# for 2 epochs: pilot tau 0.76, accuracies 79-99%.
DIGITS_CNN_SGD_SPACE = {
    "family": "resnet_flex",
    "name": "digits-cnn-sgd",
    "input_shape": [1, 8, 8],
    "num_classes": 10,
    "stages": [
        {"widths": [4, 8, 16, 24], "depths": [1, 2], "kernels": [3], "stride": 1,
         "skips": [True, False]},
        {"widths": [8, 16, 32, 48], "depths": [1, 2], "kernels": [3, 5], "stride": 2,
         "expansions": [0.5, 1.0, 2.0], "skips": [True, False]},
        {"widths": [16, 32, 64], "depths": [1, 2, 3], "kernels": [1, 3], "stride": 2,
         "expansions": [0.5, 1.0, 2.0]},
    ],
}

# 1-D CNN, small data, long training: the protocol of the outside table in issue 13 (2000
# training sequences, 20 epochs of Adam(W), 3 stages of widths 8-64, depth 1-2, kernel 3/5).
# mnist1d with num_samples=2857 splits into 2000 train / 286 val / 571 test. Pilot tau 0.65.
MNIST1D_CNN1D_2K_SPACE = {
    "family": "cnn1d",
    "name": "mnist1d-cnn1d-2k",
    "input_shape": [1, 40],
    "num_classes": 10,
    "stages": [{"widths": [8, 16, 32, 64], "depths": [1, 2], "kernels": [3, 5]}] * 3,
}

# ViT-tiny (the zoo vit, patch 2 on 8x8 digits: 16 tokens + cls), AdamW for 10 epochs. Heads do
# not change the parameter count, so this is the table where a size baseline cannot separate
# every pair and the transformer proxies have something to add. 228 valid architectures
# (width 24 with 8 heads is not); pilot tau 0.70, accuracies 64-93%.
DIGITS_VIT_SPACE = {
    "family": "vit",
    "name": "digits-vit",
    "input_shape": [1, 8, 8],
    "num_classes": 10,
    "patch_size": 2,
    "depths": [1, 2, 3, 4],
    "widths": [16, 24, 32, 48, 64],
    "heads": [1, 2, 4, 8],
    "mlp_ratios": [1.0, 2.0, 4.0],
}

# The transformer table on torch's own layers (nn.TransformerEncoder / nn.MultiheadAttention) on
# MNIST-1D: the 2,000 training samples and the 20-epoch AdamW schedule of mnist1d-cnn1d-2k, each
# token a patch of 4 time steps (10 tokens). It replaces mnist1d-seqformer (a token per time
# step, widths 16-64, 12 epochs): there small transformers barely learned MNIST-1D (accuracies
# 44-54 %), seed noise swamped the architectures and seed-to-seed tau was 0.45. Patches lift the
# accuracies to ~50-82 % and width 8 widens the capacity range; piloted on 16 architectures x 3
# seeds (tau 0.81, accuracy 50-82 %, ~18 s an architecture on one loaded core) against the rows
# of 8x8 digits as 8 tokens, 10 epochs (a pilot-only model change: tau 0.72, 64-95 %, ~6 s, but
# the data of digits-vit again, and its top saturates near 95 %). 162 architectures, 100 sampled.
MNIST1D_SEQFORMER_SPACE = {
    "family": "seqformer",
    "name": "mnist1d-seqformer-p4",
    "input_shape": [1, 40],
    "num_classes": 10,
    "patch_size": 4,
    "depths": [1, 2, 3],
    "widths": [8, 16, 24, 32, 48, 64],
    "heads": [1, 2, 4],
    "mlp_ratios": [1.0, 2.0, 4.0],
}

TABLES: dict[str, GroundTruthConfig] = {
    "digits-cnn-sgd": GroundTruthConfig(
        name="digits-cnn-sgd",
        dataset="digits",
        space=DIGITS_CNN_SGD_SPACE,
        count=120,
        seeds=(0, 1, 2),
        distill=False,
        train=TrainParams(epochs=2, optimizer="sgd", lr=0.05, warmup_epochs=0.5),
    ),
    "mnist1d-cnn1d-2k": GroundTruthConfig(
        name="mnist1d-cnn1d-2k",
        dataset="mnist1d",
        dataset_kwargs={"num_samples": 2857},
        space=MNIST1D_CNN1D_2K_SPACE,
        count=100,
        seeds=(0, 1, 2),
        distill=False,
        train=TrainParams(epochs=20, lr=3e-3, warmup_epochs=1.0),
    ),
    "mnist1d-seqformer-p4": GroundTruthConfig(
        name="mnist1d-seqformer-p4",
        dataset="mnist1d",
        dataset_kwargs={"num_samples": 2857},
        space=MNIST1D_SEQFORMER_SPACE,
        count=100,
        seeds=(0, 1, 2),
        distill=False,
        train=TrainParams(epochs=20, lr=3e-3, warmup_epochs=1.0),
    ),
    "digits-vit": GroundTruthConfig(
        name="digits-vit",
        dataset="digits",
        space=DIGITS_VIT_SPACE,
        count=120,
        seeds=(0, 1, 2),
        distill=False,
        train=TrainParams(epochs=10, lr=3e-3, warmup_epochs=1.0),
    ),
}
PRESETS |= TABLES

# ---- pools: >= 1,000 trained architectures for RoBoT (tests/fixtures/nas/pools/) -----------------
# Same protocols as digits-cnn and mnist1d-seq (so a pool's truth is that table's truth at
# scale), vanilla only. A query is seed 0's val accuracy, the truth the seed mean of test
# accuracy. digits-cnn's space has 1,152 architectures: the pool is all of it, 2 seeds. The
# MNIST-1D pool has 1 seed (query and truth from the same run, on different splits, as in
# RoBoT's NAS-Bench-201 protocol): a second seed would have cost another ~80 CPU-minutes.
POOLS: dict[str, GroundTruthConfig] = {
    "digits-cnn-full": PRESETS["digits-cnn"].replace(
        name="digits-cnn-full", count=1152, distill=False, teacher_spec=None),
    "mnist1d-cnn1d-pool": PRESETS["mnist1d-seq"].replace(
        name="mnist1d-cnn1d-pool", space=MNIST1D_SEQ_SPACE["spaces"][0], count=1000,
        seeds=(0,), distill=False, teacher_spec=None),
}


def _range(summary: dict, key: str) -> str:
    if key not in summary:
        return "–"
    return f"{summary[key]['min']:.3f}-{summary[key]['max']:.3f}"


def summarise(out_dir: Path, pool_dir: Path) -> None:
    """bench/out/nas_groundtruth.{json,md}: one row per complete fixture (tables, then pools)."""
    from bench.common import markdown_table, save
    from slimline.io import read_json

    rows, data = [], {}
    for name in [*sorted(PRESETS), *sorted(POOLS)]:
        path = (pool_dir if name in POOLS else out_dir) / f"{name}.json"
        fixture = read_json(path) if path.is_file() else {}
        if not fixture.get("complete"):
            continue
        summary, tau = fixture["summary"], fixture["seed_to_seed"]["kendall_tau"]
        families = sorted({a["family"] for a in fixture["architectures"]})
        teacher = fixture.get("teacher") or {}
        data[name] = {k: fixture.get(k) for k in ("summary", "seed_to_seed", "seconds",
                                                  "teacher", "train", "dataset_kwargs")}
        train = fixture["train"]
        rows.append([
            ("pool " if name in POOLS else "") + name, len(fixture["architectures"]),
            "+".join(families), len(fixture["seeds"]),
            f"{train['optimizer']} lr {train['lr']:g}, {train['epochs']} ep",
            fixture.get("dataset_kwargs") or "–", teacher.get("test_accuracy", "–"),
            _range(summary, "test_accuracy"), _range(summary, "distilled_test_accuracy"),
            tau["test_accuracy"], tau.get("distilled_test_accuracy", "–"), fixture["seconds"],
        ])
    header = ["fixture", "archs", "families", "seeds", "training", "data", "teacher test acc",
              "test acc (seed mean) range", "distilled range", "seed tau (test)",
              "seed tau (distilled)", "train seconds"]
    save("nas_groundtruth", {"fixtures": data}, markdown_table(header, rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tables and pools to build (see --list)")
    parser.add_argument("--list", action="store_true", help="print the presets and stop")
    parser.add_argument("--out-dir", type=Path, default=FIXTURE_DIR)
    parser.add_argument("--pool-dir", type=Path, default=POOL_DIR)
    parser.add_argument("--count", type=int, help="override the number of architectures")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="train only every N-th architecture from the I-th (parallel "
                             "workers); a final run without --shard merges the shards")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for name, config in [*PRESETS.items(), *POOLS.items()]:
            kind = "pool " if name in POOLS else "table"
            print(f"{kind} {name}: {config.count} x {len(config.seeds)} seeds, {config.dataset} "
                  f"{config.dataset_kwargs or ''} {config.train.optimizer} "
                  f"{config.train.epochs} epochs{', distilled too' if config.distill else ''}")
        return
    unknown = [n for n in args.names if n not in PRESETS and n not in POOLS]
    if unknown:
        parser.error(f"unknown table or pool {unknown[0]!r}; known: "
                     f"{', '.join([*sorted(PRESETS), *sorted(POOLS)])}")
    part, parts = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(1)  # the fixture records the thread count: results depend on it
    for name in args.names:
        config = POOLS.get(name) or PRESETS[name]
        if args.count:
            config = config.replace(count=args.count)
        directory = args.pool_dir if name in POOLS else args.out_dir
        fixture = build_groundtruth(config, directory / f"{name}.json",
                                    log=lambda line: print(line, flush=True), shard=(part, parts))
        if not fixture["complete"]:
            continue
        print(f"[{name}] seed-to-seed {fixture['seed_to_seed']}  spread {fixture['summary']}  "
              f"{fixture['seconds']}s", flush=True)
    if parts == 1:
        summarise(args.out_dir, args.pool_dir)


if __name__ == "__main__":
    main()
