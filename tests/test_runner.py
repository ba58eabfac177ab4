"""DAG runner: caching, resume after a kill, forced re-runs, atomic outputs, run-dir errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import slimline
from slimline.artifact import Artifact, CheckpointError
from slimline.io import write_json
from slimline.recipe import RecipeError
from slimline.runner import RunDirError


def test_second_run_does_no_work(tmp_path: Path, tiny_recipe) -> None:
    first = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    assert first.ran == ["train", "prune", "eval"]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "stages").rglob("*") if p.is_file()}
    second = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    assert second.ran == []
    assert all(r.status == "cached" for r in second.records)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    assert second.record("eval").metrics["accuracy"] == first.record("eval").metrics["accuracy"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.png").exists()


def test_changed_param_reruns_only_downstream(tmp_path: Path, tiny_recipe) -> None:
    slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    tiny_recipe["stages"][1]["with"]["sparsity"] = 0.7
    again = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    assert again.ran == ["prune", "eval"]
    assert again.record("prune").metrics["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_force_and_until(tmp_path: Path, tiny_recipe) -> None:
    partial = slimline.run(tiny_recipe, run_dir=tmp_path, until="prune", progress=False)
    assert partial.ran == ["train", "prune"] and partial.record("eval").status == "skipped"
    forced = slimline.run(tiny_recipe, run_dir=tmp_path, force=["prune"], progress=False)
    assert forced.ran == ["prune", "eval"]
    with pytest.raises(KeyError, match="no stage 'nope'"):
        slimline.run(tiny_recipe, run_dir=tmp_path, until="nope")


def test_same_seed_reproduces_metrics(tmp_path: Path, tiny_recipe) -> None:
    a = slimline.run(tiny_recipe, run_dir=tmp_path / "a", progress=False)
    torch.rand(100)  # whatever the caller did with the global RNG must not matter
    b = slimline.run(tiny_recipe, run_dir=tmp_path / "b", progress=False)
    assert a.record("eval").key == b.record("eval").key
    assert a.record("eval").metrics["accuracy"] == b.record("eval").metrics["accuracy"]
    sd_a, sd_b = a.artifact("prune").model.state_dict(), b.artifact("prune").model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_artifact_roundtrip_keeps_masks_and_lineage(tmp_path: Path, tiny_recipe) -> None:
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    pruned = result.artifact("prune")
    assert pruned.model_id == "prune" and pruned.parent_model_id == "train"
    assert pruned.masks and all(m.dtype == torch.bool for m in pruned.masks.values())
    evaluated = result.artifact("eval")
    assert evaluated.model_id == "prune"  # eval measures, it does not change the model
    assert evaluated.metrics["reference"] == "train"
    assert 0.0 <= evaluated.metrics["agreement"] <= 1.0
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["versions"]["torch"] == torch.__version__


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec: Python would then never raise KeyboardInterrupt. Give
    # the child the default disposition so the SIGINT case tests our handling, not the caller's.
    return subprocess.Popen([sys.executable, "-m", "slimline.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _slow_recipe(tmp_path: Path, tiny_recipe) -> Path:
    tiny_recipe["stages"].insert(1, {"id": "slow", "uses": "train",
                                     "with": {"epochs": 400}})
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    return path


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run to reach the slow stage")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_from_last_finished_stage(tmp_path: Path, tiny_recipe, sig) -> None:
    recipe = _slow_recipe(tmp_path, tiny_recipe)
    run_dir = tmp_path / "run"
    process = _cli("run", str(recipe), "--run-dir", str(run_dir), "--no-progress", cwd=tmp_path)
    stages = run_dir / "stages"
    _wait_for(lambda: any(stages.glob("train-*")) and any(stages.glob(".tmp-slow-*")))
    time.sleep(0.3)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "resume" in stderr
        assert not any(stages.glob(".tmp-*"))  # cleaned up on the way out
    finished = next(stages.glob("train-*"))
    assert (finished / "artifact.json").exists() and (finished / "weights.pt").exists()
    before = (finished / "weights.pt").stat().st_mtime_ns
    tiny_recipe = yaml.safe_load(recipe.read_text())
    tiny_recipe["stages"][1]["with"]["epochs"] = 400
    resumed = slimline.run(recipe, run_dir=run_dir, progress=False)
    assert resumed.record("train").status == "cached"
    assert resumed.ran == ["slow", "prune", "eval"]
    assert (finished / "weights.pt").stat().st_mtime_ns == before
    assert not any(stages.glob(".tmp-*"))


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_failing_stage_leaves_no_partial_output(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["stages"].append({"id": "profile", "uses": "profile.latency"})  # no export
    with pytest.raises(slimline.stage.StageFailed, match="needs an exported model"):
        slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    assert not list((tmp_path / "stages").glob("profile-*"))
    assert not list((tmp_path / "stages").glob(".tmp-*"))
    assert list((tmp_path / "stages").glob("eval-*"))  # earlier stages kept


def test_unwritable_run_dir(tmp_path: Path, tiny_recipe) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="not writable"):
        slimline.run(tiny_recipe, run_dir=blocker / "run", progress=False)


def test_locked_run_dir(tmp_path: Path, tiny_recipe) -> None:
    import fcntl

    (tmp_path / "stages").mkdir()
    with open(tmp_path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(RunDirError, match="another slimline run"):
            slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)


def test_checkpoint_model_is_used_and_mismatch_is_clear(tmp_path: Path, tiny_recipe) -> None:
    result = slimline.run(tiny_recipe, run_dir=tmp_path / "a", until="train", progress=False)
    weights = result.artifact("train").model.state_dict()
    good = tmp_path / "good.pt"
    torch.save(weights, good)
    recipe = {**tiny_recipe, "model": {**tiny_recipe["model"], "checkpoint": str(good)},
              "stages": [{"id": "eval", "uses": "eval"}]}
    evaluated = slimline.run(recipe, run_dir=tmp_path / "b", progress=False)
    assert evaluated.record("eval").metrics["accuracy"] > 0.5  # trained weights were loaded

    wrong = tmp_path / "wrong.pt"
    torch.save({k: v[:1] if v.dim() else v for k, v in weights.items()}, wrong)
    recipe["model"]["checkpoint"] = str(wrong)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        slimline.run(recipe, run_dir=tmp_path / "c", progress=False)


def test_non_torch_and_pickled_checkpoints_are_refused(tmp_path: Path, tiny_recipe) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    recipe = {**tiny_recipe, "model": {**tiny_recipe["model"], "checkpoint": str(text)}}
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        slimline.run(recipe, run_dir=tmp_path / "a", dry_run=True)
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module, not a state_dict
    recipe["model"]["checkpoint"] = str(pickled)
    with pytest.raises(CheckpointError, match="refused"):
        slimline.run(recipe, run_dir=tmp_path / "b", dry_run=True)


def test_missing_checkpoint_file(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["model"]["checkpoint"] = str(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="not found"):
        slimline.run(tiny_recipe, run_dir=tmp_path, dry_run=True)


def test_bad_dataset_argument_points_at_recipe(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["data"]["with"] = {"resise": 16}
    with pytest.raises(RecipeError, match="cannot load dataset"):
        slimline.run(tiny_recipe, run_dir=tmp_path, dry_run=True)


def test_artifact_load_refuses_other_format(tmp_path: Path, tiny_recipe) -> None:
    result = slimline.run(tiny_recipe, run_dir=tmp_path, until="train", progress=False)
    directory = result.record("train").directory
    meta = json.loads((directory / "artifact.json").read_text())
    meta["format_version"] = 999
    (directory / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="--force"):
        Artifact.load(directory)
