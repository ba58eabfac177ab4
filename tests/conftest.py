"""Shared fixtures: tiny, fast recipes so pipeline tests run in seconds on 2 cores."""

from __future__ import annotations

import copy
import os

import pytest
import torch

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
