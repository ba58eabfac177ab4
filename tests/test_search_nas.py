"""search.nas: Pareto fronts, limits, the study strategies, RoBoT in the pipeline, and workers
that join the stage's study."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from slimline.params import ParamError, parse_params
from slimline.runner import run
from slimline.search.nas import Candidate, Limits, arch_from_params, space_choices
from slimline.search.nas_config import NasConfig
from slimline.search.pareto import pareto_front
from slimline.search.space import SearchSpace
from tests.factories import TINY_SPACE


def test_pareto_front_by_hand():
    # (accuracy up, latency down): (3,2) is dominated by (3,1); (1,1) by (3,1); (2,3) by (3,1)
    points = [(3.0, 1.0), (3.0, 2.0), (1.0, 1.0), (5.0, 4.0), (2.0, 3.0), (5.0, 4.0)]
    assert pareto_front(points, ["maximize", "minimize"]) == [0, 3, 5]
    assert pareto_front(points, ["minimize", "minimize"]) == [2]
    with pytest.raises(ValueError, match="maximize or minimize"):
        pareto_front(points, ["up", "down"])


def test_limits_use_optuna_sign_convention():
    space = SearchSpace.from_dict(TINY_SPACE)
    arch = space.sample(1)[0]
    candidate = Candidate(arch, arch.digest, {}, params=200, flops=1000, latency_ms=0.5)
    assert Limits(max_params=100).violations(candidate) == [1.0]
    assert Limits(max_params=400, max_latency_ms=1.0).violations(candidate) == [-0.5, -0.5]
    assert Limits(max_params=400).feasible(candidate)
    assert not Limits(max_flops=999).feasible(candidate)


def test_choices_round_trip_every_architecture():
    space = SearchSpace.from_dict(TINY_SPACE)
    choices = space_choices(space)
    assert choices["s1.depth"] == [1, 2]
    for arch in space.sample(space.size):
        params = {"s0.width": arch.widths[0], "s0.depth": arch.depths[0],
                  "s0.kernel": arch.kernels[0], "s1.width": arch.widths[1],
                  "s1.depth": arch.depths[1], "s1.kernel": arch.kernels[1]}
        assert arch_from_params(space, params) == arch


def test_params_are_checked():
    with pytest.raises(ParamError, match="max_latency_ms"):
        parse_params(NasConfig, {"latency": "none", "max_latency_ms": 1.0})
    with pytest.raises(ParamError, match="query_budget"):
        parse_params(NasConfig, {"strategy": "robot", "query_budget": 20, "pool_size": 10})
    p = parse_params(NasConfig, {"accuracy_proxy": "snip", "proxies": ["naswot"]})
    assert p.proxies == ["naswot", "snip"]


def _recipe(tmp_path: Path, search: dict, *, name: str = "nas") -> Path:
    (tmp_path / "space.yaml").write_text(json.dumps(TINY_SPACE))
    recipe = {
        "name": name, "seed": 0,
        "model": {"name": "resnet", "with": {"depth": 8, "width": 8}},
        "data": {"name": "digits"},
        "stages": [
            {"id": "teacher", "uses": "train", "with": {"epochs": 1}},
            {"id": "search", "uses": "search.nas", "needs": ["teacher"],
             "with": {"space": str(tmp_path / "space.yaml"), **search}},
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def _search_json(result) -> dict:
    return json.loads((result.record("search").directory / "search.json").read_text())


def test_study_strategy_respects_limits_and_picks_the_best_feasible(tmp_path):
    path = _recipe(tmp_path, {"strategy": "tpe", "trials": 6, "latency": "none",
                              "accuracy_proxy": "naswot", "proxies": ["naswot", "params"],
                              "max_params": 6000})
    result = run(path, run_dir=tmp_path / "run", progress=False)
    data = _search_json(result)
    rows = data["candidates"]
    assert len(rows) == 6
    feasible = [r for r in rows if r["params"] <= 6000]
    assert feasible
    assert data["summary"]["feasible"] == len(feasible)
    best = max(feasible, key=lambda r: r["scores"]["naswot"])
    assert data["summary"]["chosen"]["digest"] == best["digest"]
    student = result.artifact("search")
    assert sum(t.numel() for t in student.model.parameters()) == best["params"]
    assert student.model_spec["name"] == "resnet_flex"


def test_nsga2_with_a_latency_table_writes_a_front(tmp_path):
    path = _recipe(tmp_path, {"trials": 8, "proxies": ["naswot"], "latency": "table"})
    result = run(path, run_dir=tmp_path / "run", progress=False)
    directory = result.record("search").directory
    data = _search_json(result)
    front = set(data["summary"]["pareto"])
    rows = {r["digest"]: r for r in data["candidates"]}
    assert front and (directory / "pareto.png").is_file()
    assert (directory / "latency_table.json").is_file()
    assert not list(directory.rglob("*.onnx"))  # the timed block files are not kept
    for digest in front:  # nothing evaluated dominates a front member
        a = rows[digest]
        assert not any(b["accuracy_score"] >= a["accuracy_score"]
                       and b["latency_ms"] <= a["latency_ms"]
                       and (b["accuracy_score"] > a["accuracy_score"]
                            or b["latency_ms"] < a["latency_ms"])
                       for b in rows.values())
    assert "Pareto front" in (directory / "search.md").read_text()


def test_robot_strategy_queries_the_budget_and_returns_the_best_query(tmp_path):
    path = _recipe(tmp_path, {"strategy": "robot", "pool_size": 8, "query_budget": 3,
                              "query_epochs": 1, "latency": "none",
                              "proxies": ["naswot", "synflow", "params"]})
    result = run(path, run_dir=tmp_path / "run", progress=False)
    summary = _search_json(result)["summary"]
    robot = summary["robot"]
    assert len(robot["queried"]) == len(set(robot["queried"])) == 3
    best = robot["queried"][max(range(3), key=lambda i: robot["query_val_accuracy"][i])]
    assert summary["chosen"]["digest"] == best
    assert set(robot["weights"]) == {"naswot", "synflow", "params"}


def test_impossible_limits_fail_with_the_closest_candidate(tmp_path):
    path = _recipe(tmp_path, {"strategy": "random", "trials": 3, "latency": "none",
                              "proxies": ["params"], "accuracy_proxy": "params",
                              "max_params": 10})
    with pytest.raises(Exception, match="none of the 3 evaluated architectures meets the limits"):
        run(path, run_dir=tmp_path / "run", progress=False)


def test_worker_without_shared_storage_says_how_to_share(tmp_path):
    path = _recipe(tmp_path, {"trials": 2, "latency": "none", "proxies": ["params"]})
    done = subprocess.run([sys.executable, "-m", "slimline.cli", "search", "worker", str(path),
                           "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "set `storage:` in the recipe" in done.stderr


def test_a_worker_fills_the_study_and_the_stage_uses_its_trials(tmp_path):
    """A `slimline search worker` process joins the study the stage will open (same name from
    the stage's cache key, same objective); run first, it does all the work, and the stage then
    evaluates nothing itself."""
    journal = tmp_path / "study.log"
    path = _recipe(tmp_path, {"strategy": "random", "trials": 4, "latency": "none",
                              "proxies": ["naswot"], "storage": str(journal)})
    done = subprocess.run([sys.executable, "-m", "slimline.cli", "search", "worker", str(path),
                           "--run-dir", str(tmp_path / "run"), "--worker-id", "w1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "this worker ran 4 trial(s)" in done.stdout
    result = run(path, run_dir=tmp_path / "run", progress=False)
    assert result.record("teacher").status == "cached"  # the worker trained it already
    import optuna

    study = optuna.load_study(study_name=None, storage=_journal_storage(journal))
    workers = {t.user_attrs.get("worker_id") for t in study.trials
               if t.state == optuna.trial.TrialState.COMPLETE}
    assert workers == {"w1"}
    assert len(_search_json(result)["candidates"]) == 4
    assert not math.isnan(_search_json(result)["summary"]["chosen"]["accuracy_score"])


def _journal_storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def test_nas_distill_recipe_end_to_end_small(tmp_path):
    """recipes/nas_distill.yaml, shrunk: the student is searched under 70% of the teacher's
    latency, distilled, exported and profiled, and the report shows teacher and student."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "nas_distill.yaml")
                            .read_text())
    stages = {s["id"]: s for s in recipe["stages"]}
    stages["teacher"]["with"]["epochs"] = 2
    stages["search"]["with"].update(trials=16, max_latency_ratio=0.7)
    stages["student"]["with"]["epochs"] = 2
    for profile in ("profile_teacher", "profile_student"):
        stages[profile]["with"] = {"batch_sizes": [1], "runs": 20}
    result = run(recipe, run_dir=tmp_path / "run", progress=False)
    summary = result.record("search").metrics["search"]
    chosen = summary["chosen"]
    assert chosen["latency_ms"] <= summary["limits"]["max_latency_ms"]
    assert summary["limits"]["max_latency_ms"] == pytest.approx(
        0.7 * summary["teacher_latency_ms"])
    assert chosen["params"] < summary["teacher"]["params"]
    student = result.record("student")
    assert student.metrics["parameters"] == chosen["params"]
    report = result.report_path.read_text()
    assert "student → export_student" in report and "teacher → export_teacher" in report
    assert "search over `digits-resnet-flex`" in report


def test_inline_vit_space_skips_invalid_combinations_and_measures_latency(tmp_path):
    """A transformer space written inline in the recipe: widths the head count does not divide
    are pruned trials (never evaluated, not counted), latency is measured per candidate."""
    vit = {"family": "vit", "name": "tiny-vit", "input_shape": [1, 8, 8], "patch_size": 2,
           "depths": [1, 2], "widths": [12, 16], "heads": [3, 4], "mlp_ratios": [1, 2]}
    recipe = {
        "name": "vitnas", "seed": 0, "model": {"name": "mlp"}, "data": {"name": "digits"},
        "stages": [
            {"id": "teacher", "uses": "train", "with": {"epochs": 1}},
            {"id": "search", "uses": "search.nas", "needs": ["teacher"],
             "with": {"space": vit, "strategy": "random", "trials": 4, "latency": "measure",
                      "accuracy_proxy": "synaptic_diversity",
                      "proxies": ["attention_confidence", "params"]}},
        ],
    }
    result = run(recipe, run_dir=tmp_path / "run", progress=False)
    rows = _search_json(result)["candidates"]
    assert len(rows) == 4
    for row in rows:
        assert row["arch"]["width"] % row["arch"]["heads"] == 0
        assert row["latency_ms"] > 0
    assert result.artifact("search").model_spec["name"] == "vit"


def test_bad_inline_space_fails_validation_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nmodel: {name: mlp}\ndata: {name: digits}\nstages:\n"
        "  - id: search\n    uses: search.nas\n    with:\n"
        "      space: {family: vit, input_shape: [1, 8, 8], depths: [1], widths: [10],\n"
        "              heads: [3], mlp_ratios: [1]}\n")
    import slimline
    from slimline.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"bad.yaml:8: stages\[0\].with.space: .*heads"):
        slimline.validate(path)
