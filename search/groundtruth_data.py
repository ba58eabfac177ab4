"""Reading ground-truth fixtures, and the rank correlations they are judged by.

A fixture (``tests/fixtures/nas/<name>.json``, pools under ``tests/fixtures/nas/pools/``) is
written by :func:`slimline.search.groundtruth.build_groundtruth`; this module only reads it, so
the proxies, the leaderboard and the search reports need nothing of the training code.

    from slimline.search.groundtruth_data import load_fixture
    truth = load_fixture("digits-cnn")
    truth.mean_accuracy("test_accuracy")   # one value per architecture
    model = truth.build_model(0)           # untrained, as the search would build it
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimline.data import Dataset, load_dataset
from slimline.io import read_json
from slimline.search.space_loading import space_from_dict
from slimline.training import TrainParams

__all__ = [
    "ACCURACY_KEYS",
    "FIXTURE_DIR",
    "FORMAT",
    "POOL_DIR",
    "GroundTruth",
    "kendall_tau",
    "load_fixture",
    "seed_to_seed",
    "spearman",
]

FORMAT = 1
FIXTURE_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nas"
POOL_DIR = FIXTURE_DIR / "pools"
VANILLA_KEYS = ("val_accuracy", "test_accuracy")
ACCURACY_KEYS = (*VANILLA_KEYS, "distilled_val_accuracy", "distilled_test_accuracy")


# ---- rank correlation ------------------------------------------------------------------------
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (ties in either ranking corrected, Kendall 1945), via scipy.

    ``None`` when undefined (fewer than two values, or one ranking constant)."""
    from scipy.stats import kendalltau

    return _finite(kendalltau(x, y, variant="b").statistic) if len(x) > 1 else None


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson correlation of average ranks (ties share their mean rank)."""
    from scipy.stats import spearmanr

    return _finite(spearmanr(x, y).statistic) if len(x) > 1 else None


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def seed_to_seed(architectures: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """How reproducible the ranking is: the rank agreement of two training seeds over the
    architectures, averaged over every pair of seeds (one pair for two seeds). This is the
    ceiling a proxy's agreement with the seed mean can be judged against."""
    result: dict[str, dict[str, Any]] = {"kendall_tau": {}, "spearman": {}, "seed_pairs": {}}
    for key in ("test_accuracy", "distilled_test_accuracy", "val_accuracy"):
        runs = [a[key] for a in architectures if key in a]
        if not runs or len(runs) != len(architectures):
            continue
        seeds = min(len(r) for r in runs)
        pairs = list(itertools.combinations(range(seeds), 2))
        for measure, fn in (("kendall_tau", kendall_tau), ("spearman", spearman)):
            values = [fn([r[i] for r in runs], [r[j] for r in runs]) for i, j in pairs]
            values = [v for v in values if v is not None]
            result[measure][key] = sum(values) / len(values) if values else None
        result["seed_pairs"][key] = len(pairs)
    return result


# ---- reading fixtures --------------------------------------------------------------------------
@dataclass
class GroundTruth:
    """A loaded fixture: ``architectures[i]`` is entry ``i`` (format:
    :mod:`slimline.search.groundtruth`)."""

    name: str
    dataset: str
    dataset_kwargs: dict[str, Any]
    space: Any
    train: TrainParams
    seeds: list[int]
    teacher: dict[str, Any] | None
    distill: dict[str, Any] | None
    architectures: list[dict[str, Any]]
    raw: dict[str, Any]

    def __len__(self) -> int:
        return len(self.architectures)

    @property
    def distilled(self) -> bool:
        """Whether the fixture has distilled accuracies (tables built with a teacher)."""
        return self.distill is not None

    def arch(self, index: int) -> Any:
        """Architecture ``index`` as the space's architecture object."""
        return self.space.architecture_from_dict(self.architectures[index]["arch"])

    def build_model(self, index: int) -> nn.Module:
        """Architecture ``index``, freshly initialised."""
        return self.space.build_model(self.arch(index))

    def model_spec(self, index: int) -> dict[str, Any]:
        return self.space.model_spec(self.arch(index))

    def mean_accuracy(self, key: str = "test_accuracy") -> list[float]:
        """Seed-averaged ``key`` (one of val/test, optionally ``distilled_``) per architecture."""
        if key not in ACCURACY_KEYS:
            raise KeyError(f"unknown accuracy key {key!r}; use one of {', '.join(ACCURACY_KEYS)}")
        if key not in VANILLA_KEYS and not self.distilled:
            raise KeyError(f"fixture {self.name!r} was built without distillation: it has no "
                           f"{key!r}; use {' or '.join(VANILLA_KEYS)}")
        return [sum(a[key]) / len(a[key]) for a in self.architectures]

    def values(self, key: str) -> list[Any]:
        """A per-architecture field, e.g. ``params``, ``flops`` or ``family``."""
        return [a[key] for a in self.architectures]

    def load_dataset(self) -> Dataset:
        return load_dataset(self.dataset, **self.dataset_kwargs)


def fixture_path(name_or_path: str | Path) -> Path:
    """``digits-cnn`` -> ``tests/fixtures/nas/digits-cnn.json``; a pool's name (``pools/...``
    or a bare name found only under ``pools/``) or any path with a suffix is taken as given."""
    path = Path(name_or_path)
    if path.suffix:
        return path
    direct = FIXTURE_DIR / f"{name_or_path}.json"
    pooled = POOL_DIR / f"{name_or_path}.json"
    return pooled if not direct.is_file() and pooled.is_file() else direct


def known_fixtures() -> list[str]:
    """Names of the tables in ``tests/fixtures/nas`` and of the pools in its ``pools/``."""
    tables = sorted(p.stem for p in FIXTURE_DIR.glob("*.json")) if FIXTURE_DIR.is_dir() else []
    pools = sorted(p.stem for p in POOL_DIR.glob("*.json")) if POOL_DIR.is_dir() else []
    return tables + [f"pools/{p}" for p in pools]


def load_fixture(name_or_path: str | Path) -> GroundTruth:
    """A fixture by name (``digits-cnn``, ``pools/digits-cnn-full``) or by path."""
    path = fixture_path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no ground-truth fixture {str(name_or_path)!r} (looked for {path}); known: "
            f"{', '.join(known_fixtures()) or 'none'}; build one with "
            "bench/build_nas_groundtruth.py"
        )
    data = read_json(path)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: fixture format {data.get('format')!r}, expected {FORMAT}")
    return GroundTruth(
        name=data["name"],
        dataset=data["dataset"],
        dataset_kwargs=data.get("dataset_kwargs", {}),
        space=space_from_dict(data["space"], source=f"{path}: space"),
        train=TrainParams(**data["train"]),
        seeds=list(data["seeds"]),
        teacher=data.get("teacher"),
        distill=data.get("distill"),
        architectures=data["architectures"],
        raw=data,
    )
