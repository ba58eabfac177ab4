"""Run a function on two gloo ranks in spawned processes, for the data-parallel tests.

Every rank finishes its collectives (a barrier) before the group is torn down, and each worker
process ends with ``os._exit`` once its results are on disk: the rare failure seen here was a
SIGABRT ("terminate called without an active exception") from gloo's threads while a worker
process was shutting down, after all of its results had been written; no assertion of ours
depends on that teardown.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_gloo(fn: Callable[..., None], store: str, *args: Any, nprocs: int = 2) -> None:
    """``fn(rank, *args)`` on ``nprocs`` ranks joined through a ``file://{store}`` rendezvous;
    raises if any rank fails (its traceback is on stderr)."""
    mp.spawn(_entry, args=(nprocs, store, fn, args), nprocs=nprocs, join=True)


def _entry(rank: int, world_size: int, store: str, fn: Callable[..., None],
           args: tuple[Any, ...]) -> None:
    code = 0
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, *args)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported below, the exit code carries it
        traceback.print_exc()
        code = 1
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
