"""Training under torch.distributed (2 CPU processes, gloo) matches one process; ``slimline run``
under torchrun writes the run directory once and fails every rank when one fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

import slimline
from slimline.artifact import Artifact
from slimline.data import load_dataset
from slimline.models import build_model
from tests.gloo_spawn import spawn_gloo


def _train_both(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    results = {}
    for name in ("pdp", "qat"):
        torch.manual_seed(0)
        model = build_model("mlp", num_classes=10, in_channels=1, input_size=(8, 8), hidden=[32])
        if name == "pdp":  # the public API: the same call a user makes
            slimline.prune(
                model,
                slimline.PDPConfig(sparsity=0.7, epochs=3, warmup_epochs=1, epsilon=0.7,
                                   batch_size=50),
                data=data,
                seed=3,
            )
        else:
            slimline.quantize(
                model,
                slimline.QATConfig(epochs=2, cga=True, cga_epochs=1, skip=None, weight_bits=4,
                                   activation_bits=8, batch_size=50),
                data=data,
                seed=3,
            )
        results[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return results


def _worker(rank: int, out: str) -> None:
    results = _train_both(rank)
    if rank == 0:  # only rank 0 writes
        torch.save(results, out)


def test_two_processes_match_one(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn_gloo(_worker, str(tmp_path / "store"), str(out))
    distributed = torch.load(out, weights_only=True)
    single = _train_both(0)
    for name in ("pdp", "qat"):
        for key, value in single[name].items():
            other = distributed[name][key]
            if name == "pdp" and key.endswith("weight"):  # same pruning pattern
                assert ((value == 0) == (other == 0)).float().mean() > 0.99, key
            # 1 process vs 2 differ only in the order of floating-point reductions; a weight
            # sitting on a rounding boundary may still land one level apart.
            close = torch.isclose(value, other, atol=1e-3, rtol=1e-3).float().mean()
            assert close > 0.98, (name, key, float(close))


# --- slimline run under torchrun ------------------------------------------------------------

DDP_RECIPE = {
    "name": "ddp",
    "seed": 0,
    "model": {"name": "mlp", "with": {"hidden": [32]}},
    "data": {"name": "digits"},
    "stages": [
        {"id": "train", "uses": "train", "with": {"epochs": 2, "batch_size": 50}},
        {"id": "pdp", "uses": "prune.pdp",
         "with": {"sparsity": 0.7, "epochs": 3, "warmup_epochs": 1, "epsilon": 0.7,
                  "batch_size": 50}},
        {"id": "eval", "uses": "eval"},
    ],
}


def _torchrun(recipe: Path, run_dir: Path, tmp: Path) -> subprocess.CompletedProcess:
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "slimline.cli", "run", str(recipe), "--run-dir", str(run_dir), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240, check=False)


def test_torchrun_writes_once_matches_one_process_and_hits_cache(tmp_path: Path) -> None:
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(DDP_RECIPE))
    single = slimline.run(DDP_RECIPE, run_dir=tmp_path / "one", progress=False)

    first = _torchrun(recipe, tmp_path / "two", tmp_path / "tmp")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("3 stage(s) ran, 0 cached") == 2  # both ranks ran every stage
    # Only rank 0 logs, takes the lock and writes: one "running" line and one directory per
    # stage, no temp directories left behind (rank 1 worked in TMPDIR and cleaned up).
    assert [line for line in first.stderr.splitlines() if line.endswith(": running")] == [
        "[1/3] train (train): running", "[2/3] pdp (prune.pdp): running",
        "[3/3] eval (eval): running"]
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(tmp_path / "two") == names(tmp_path / "one")
    assert names(tmp_path / "two" / "stages") == names(tmp_path / "one" / "stages")  # same keys
    assert list((tmp_path / "tmp").glob("slimline-*")) == []

    run_json = json.loads((tmp_path / "two" / "run.json").read_text())
    assert [s["status"] for s in run_json["stages"]] == ["ran", "ran", "ran"]
    two = {s["id"]: s["metrics"] for s in run_json["stages"]}
    for stage in ("train", "pdp"):
        assert abs(two[stage]["val_accuracy"] - single.record(stage).metrics["val_accuracy"]) \
            <= 0.02, stage
    assert two["pdp"]["sparsity"] == pytest.approx(single.record("pdp").metrics["sparsity"],
                                                   abs=1e-3)
    stage_dir = next((tmp_path / "two" / "stages").glob("pdp-*"))
    distributed = Artifact.load(stage_dir).model.state_dict()
    for key, value in single.artifact("pdp").model.state_dict().items():
        if key.endswith("weight"):  # same pruning pattern
            assert ((value == 0) == (distributed[key] == 0)).float().mean() > 0.99, key
        close = torch.isclose(value, distributed[key], atol=1e-3, rtol=1e-3).float().mean()
        assert close > 0.98, (key, float(close))

    again = _torchrun(recipe, tmp_path / "two", tmp_path / "tmp")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("0 stage(s) ran, 3 cached") == 2  # the cache hit on both ranks
    run_json = json.loads((tmp_path / "two" / "run.json").read_text())
    assert [s["status"] for s in run_json["stages"]] == ["cached", "cached", "cached"]


def _group_worker(rank: int, port: int, scenario: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), SLIMLINE_DIST_FAILED_WAIT="3")
    import importlib

    import slimline.distributed as distributed

    importlib.reload(distributed)  # read the short wait set above
    started = time.perf_counter()
    outcome = "ok"
    try:
        with distributed.rank_group() as group:
            def work() -> None:
                if rank == 1:
                    raise ValueError("boom on rank 1")
                if scenario == "in_collective":  # rank 0 is blocked in training's all_reduce
                    dist.all_reduce(torch.ones(3))

            group.attempt("stage 'train'", work)
    except Exception as exc:  # noqa: BLE001 (the test inspects it)
        outcome = f"{type(exc).__name__}: {exc}"
    Path(f"{out}.{rank}").write_text(f"{outcome}\n{time.perf_counter() - started:.1f}")
    if scenario == "in_collective" and rank == 1:
        os._exit(1)  # what the CLI does after an error; it frees rank 0's collective


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scenario", ["both_report", "in_collective"])
def test_failure_on_one_rank_fails_every_rank(tmp_path: Path, scenario: str) -> None:
    out = str(tmp_path / "outcome")
    context = mp.get_context("spawn")
    workers = [context.Process(target=_group_worker, args=(rank, port, scenario, out))
               for port in [_free_port()] for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert not worker.is_alive(), "a rank hung"
    outcome = {rank: Path(f"{out}.{rank}").read_text().splitlines() for rank in range(2)}
    assert outcome[1][0] == "ValueError: boom on rank 1"  # its own error, unchanged
    if scenario == "both_report":
        assert outcome[0][0] == ("PeerFailed: rank 1 of 2 failed during stage 'train': "
                                 "ValueError: boom on rank 1")
    else:  # rank 1 could not report; rank 0 learns it lost its peer instead of hanging
        assert outcome[0][0].startswith("PeerFailed: rank 0: lost contact with the other ranks")
    assert float(outcome[0][1]) < 30
