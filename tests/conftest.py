"""Shared fixtures: tiny, fast recipes so pipeline tests run in seconds on 2 cores."""

from __future__ import annotations

import copy
import os

import pytest

# One thread everywhere, subprocesses (CLI, workers, torchrun) included: on a loaded 2-core
# machine OpenMP threads that spin at barriers make training tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS: it is read when torch starts its pool)

# Tests must not depend on (or fill) the user's cache.
os.environ.setdefault("SLIMLINE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache",
                                                     "test"))
torch.set_num_threads(1)

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "mlp", "with": {"hidden": [32]}},
    "data": {"name": "digits"},
    "stages": [
        {"id": "train", "uses": "train", "with": {"epochs": 2}},
        {"id": "prune", "uses": "prune.magnitude", "with": {"sparsity": 0.5}},
        {"id": "eval", "uses": "eval"},
    ],
}


@pytest.fixture
def tiny_recipe() -> dict:
    return copy.deepcopy(TINY_RECIPE)
