"""search.nas's default accuracy objective (the fitted rank ensemble) and the report's
ground-truth check: what the stage computes, writes and refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimline.compress.prune.flops import count_params
from slimline.params import ParamError, parse_params
from slimline.runner import run
from slimline.search.ensemble import DEFAULT_MEMBERS
from slimline.search.nas_config import NasConfig
from slimline.search.space import SearchSpace
from tests.factories import TINY_SPACE


def test_default_objective_is_the_ensemble_and_its_members_are_computed():
    p = parse_params(NasConfig, {})
    assert p.accuracy_proxy == "ensemble"
    assert set(DEFAULT_MEMBERS) <= set(p.proxies) and "ensemble" not in p.proxies
    with pytest.raises(ParamError, match="ensemble_queries"):
        parse_params(NasConfig, {"ensemble_queries": 9, "ensemble_pool": 8})
    with pytest.raises(ParamError, match="ensemble_members.*'snp'"):
        parse_params(NasConfig, {"ensemble_members": ["params", "snp"]})
    single = parse_params(NasConfig, {"accuracy_proxy": "naswot", "proxies": ["params"]})
    assert single.proxies == ["params", "naswot"]


def _fake_table(path: Path) -> Path:
    """Every architecture of TINY_SPACE with a made-up accuracy that grows with #params, so
    #params ranks this table perfectly (tau 1)."""
    space = SearchSpace.from_dict(TINY_SPACE)
    archs = space.sample(space.size)
    sizes = [count_params(space.build_model(a)) for a in archs]
    order = sorted(range(len(archs)), key=lambda i: sizes[i])
    entries = [{"arch": a.to_dict(), "digest": a.digest, "family": "resnet_flex",
                "params": sizes[i], "flops": 1000 - sizes[i],
                "val_accuracy": [0.5, 0.5],
                "test_accuracy": [0.1 + 0.1 * order.index(i)] * 2}
               for i, a in enumerate(archs)]
    path.write_text(json.dumps({
        "format": 1, "name": "tiny-table", "dataset": "digits", "dataset_kwargs": {},
        "space": space.to_dict(), "train": {}, "seeds": [0, 1], "teacher": None,
        "distill": None, "architectures": entries,
        "seed_to_seed": {"kendall_tau": {"test_accuracy": 1.0}}}))
    return path


def _run(tmp_path: Path, search: dict) -> dict:
    recipe = {
        "name": "objective", "seed": 0,
        "model": {"name": "resnet", "with": {"depth": 8, "width": 8}},
        "data": {"name": "digits"},
        "stages": [
            {"id": "teacher", "uses": "train", "with": {"epochs": 1}},
            {"id": "search", "uses": "search.nas", "needs": ["teacher"],
             "with": {"space": TINY_SPACE, "strategy": "random", "trials": 6,
                      "latency": "none", "proxies": ["params"], "query_epochs": 1, **search}},
        ],
    }
    result = run(recipe, run_dir=tmp_path / "run", progress=False)
    directory = result.record("search").directory
    data = json.loads((directory / "search.json").read_text())
    data["markdown"] = (directory / "search.md").read_text()
    return data


def test_fitted_ensemble_is_the_objective_and_the_report_shows_its_tau(tmp_path):
    table = _fake_table(tmp_path / "tiny-table.json")
    data = _run(tmp_path, {"ensemble_queries": 4, "ensemble_pool": 8,
                           "groundtruth": str(table)})
    summary, rows = data["summary"], data["candidates"]
    ensemble = summary["ensemble"]
    assert summary["accuracy_objective"] == "ensemble"
    assert ensemble["reference_pool"] == 8 and len(ensemble["queried"]) == 4
    assert ensemble["fit"]["queried"] == 4 and ensemble["fit"]["chosen"] == ensemble["ensemble"]
    assert set(ensemble["weights"]) <= set(DEFAULT_MEMBERS)
    scores = [r["scores"]["ensemble"] for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert summary["chosen"]["scores"]["ensemble"] == max(scores)
    (check,) = summary["groundtruth"]
    assert check["table"] == "tiny-table" and check["architectures"] == 8
    assert check["tau_params"] == pytest.approx(1.0)
    assert check["tau_flops"] == pytest.approx(-1.0)
    assert -1.0 <= check["tau_objective"] <= 1.0
    text = data["markdown"]
    assert "Accuracy objective: rank ensemble" in text
    assert "## Objective vs trained accuracy (ground truth)" in text
    assert "| `tiny-table` | 8 | ensemble (" in text


def test_no_queries_keeps_the_prior_and_no_table_is_said(tmp_path):
    data = _run(tmp_path, {"ensemble_queries": 0, "ensemble_pool": 8})
    ensemble = data["summary"]["ensemble"]
    assert ensemble["ensemble"] == "params" and ensemble["fit"] is None
    assert data["summary"]["groundtruth"] == []
    assert "the prior: nothing was trained" in data["markdown"]
    assert "No ground-truth table covers this space" in data["markdown"]
    # With #params as the objective the chosen architecture is the largest one evaluated.
    rows = data["candidates"]
    assert data["summary"]["chosen"]["params"] == max(r["params"] for r in rows)
