"""Proxy scores of a fixture, computed once per (fixture content, proxies, batch, proxy seed,
torch version) and kept in ``bench/out/proxy-scores/`` (shared by the leaderboard, the RoBoT
benchmark and the ensemble study)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import OUT
from slimline.io import read_json, write_json
from slimline.search.leaderboard import TableScores, score_table

CACHE = OUT / "proxy-scores"


def _key(truth: Any, names: Sequence[str], seed: int, batch: int, teacher: bool) -> str:
    text = json.dumps({"digests": truth.values("digest"), "space": truth.raw["space"],
                       "dataset": [truth.dataset, truth.dataset_kwargs], "proxies": list(names),
                       "seed": seed, "batch": batch, "teacher": teacher,
                       "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_scores(truth: Any, names: Sequence[str], seed: int, *, batch: int = 64,
                  teacher: torch.nn.Module | None = None, log=print) -> TableScores:
    """:func:`slimline.search.leaderboard.score_table`, or its stored result."""
    key = _key(truth, names, seed, batch, teacher is not None)
    path = CACHE / f"{truth.name}-seed{seed}-{key}.json"
    if path.is_file():
        stored = read_json(path)
        if stored.get("key") == key:
            return TableScores.from_dict(stored["result"])
    log(f"[{truth.name}] scoring {len(truth)} architectures, proxy seed {seed}")
    result = score_table(truth, names, seed=seed, batch=batch, teacher=teacher, log=log)
    write_json(path, {"key": key, "result": result.to_dict()})
    return result
