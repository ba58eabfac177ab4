"""prune.pdp and quant.qat under torch.distributed (2 CPU processes, gloo) match one process."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimline.data import load_dataset
from slimline.models import build_model
from slimline.stages.prune_pdp import PDPParams, train_pdp
from slimline.stages.quant_qat import QATParams, train_qat


def _train_both(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    results = {}
    for name in ("pdp", "qat"):
        torch.manual_seed(0)
        model = build_model("mlp", num_classes=10, in_channels=1, input_size=(8, 8), hidden=[32])
        if name == "pdp":
            train_pdp(
                model,
                data,
                PDPParams(sparsity=0.7, epochs=3, warmup_epochs=1, epsilon=0.7, batch_size=50),
                seed=3,
            )
        else:
            train_qat(
                model,
                data,
                QATParams(
                    epochs=2,
                    cga=True,
                    cga_epochs=1,
                    skip=None,
                    weight_bits=4,
                    activation_bits=8,
                    batch_size=50,
                ),
                seed=3,
            )
        results[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return results


def _worker(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = _train_both(rank)
        if rank == 0:  # only rank 0 writes
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
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
