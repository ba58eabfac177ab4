"""Build the NAS ground-truth fixtures in tests/fixtures/nas/ (see search/groundtruth.py).

    OMP_NUM_THREADS=1 nice -n 10 python bench/build_nas_groundtruth.py digits-cnn mnist1d-seq

Resumable: a killed run continues where it stopped. One progress line per architecture.
Parallel: run ``--shard 0/2`` and ``--shard 1/2`` side by side, then once more without
``--shard`` to merge them into the fixture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimline.search.groundtruth import FIXTURE_DIR, GroundTruthConfig, build_groundtruth  # noqa: E402
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


def summarise(out_dir: Path) -> None:
    """bench/out/nas_groundtruth.{json,md}: one row per complete fixture in ``out_dir``."""
    from bench.common import markdown_table, save
    from slimline.io import read_json

    rows, data = [], {}
    for name in sorted(PRESETS):
        path = out_dir / f"{name}.json"
        fixture = read_json(path) if path.is_file() else {}
        if not fixture.get("complete"):
            continue
        summary, tau = fixture["summary"], fixture["seed_to_seed"]["kendall_tau"]
        families = sorted({a["family"] for a in fixture["architectures"]})
        data[name] = {k: fixture[k] for k in ("summary", "seed_to_seed", "seconds", "teacher")}
        rows.append([
            name, len(fixture["architectures"]), "+".join(families),
            fixture["train"]["epochs"], fixture["teacher"]["test_accuracy"],
            f"{summary['test_accuracy']['min']:.3f}-{summary['test_accuracy']['max']:.3f}",
            f"{summary['distilled_test_accuracy']['min']:.3f}-"
            f"{summary['distilled_test_accuracy']['max']:.3f}",
            tau["test_accuracy"], tau["distilled_test_accuracy"], fixture["seconds"],
        ])
    header = ["fixture", "archs", "families", "epochs", "teacher test acc",
              "test acc (seed mean) range", "distilled range", "seed tau (test)",
              "seed tau (distilled)", "train seconds"]
    save("nas_groundtruth", {"fixtures": data}, markdown_table(header, rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(PRESETS))
    parser.add_argument("--out-dir", type=Path, default=FIXTURE_DIR)
    parser.add_argument("--count", type=int, help="override the number of architectures")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="train only every N-th architecture from the I-th (parallel "
                             "workers); a final run without --shard merges the shards")
    args = parser.parse_args(argv)
    part, parts = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(1)  # the fixture records the thread count: results depend on it
    for name in args.names:
        config = PRESETS[name]
        if args.count:
            config = config.replace(count=args.count)
        fixture = build_groundtruth(config, args.out_dir / f"{name}.json",
                                    log=lambda line: print(line, flush=True), shard=(part, parts))
        if not fixture["complete"]:
            continue
        print(f"[{name}] seed-to-seed {fixture['seed_to_seed']}  spread {fixture['summary']}  "
              f"{fixture['seconds']}s", flush=True)
    if parts == 1:
        summarise(args.out_dir)


if __name__ == "__main__":
    main()
