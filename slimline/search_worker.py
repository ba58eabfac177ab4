"""``slimline search worker RECIPE``: one more process working on a recipe's ``search.nas`` study.

A worker runs (or finds cached) everything the search stage needs, rebuilds exactly the
objective the stage uses (same space, proxy mini-batch, latency model and limits: all derived
from the recipe and its seed), joins the study at the shared storage URL and evaluates trials
until the study holds the stage's ``trials``. Start any number, on any machines that can reach
the storage; the stage itself is one more worker and then waits for the rest. The study name
carries the stage's cache key, so workers of a changed recipe never mix into an old study.
"""

from __future__ import annotations

import os
import socket
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkerResult", "run_search_worker"]


@dataclass
class WorkerResult:
    study_name: str
    storage: str
    trials_run: int
    complete: int


def run_search_worker(recipe_path: str | os.PathLike, *, stage_id: str | None = None,
                      storage: str | None = None, run_dir: str | os.PathLike | None = None,
                      worker_id: str | None = None, progress: bool = True) -> WorkerResult:
    """Join the study of ``stage_id`` (default: the recipe's only ``search.nas`` stage)."""
    from slimline.dag import build_plan
    from slimline.recipe import load_recipe
    from slimline.runner import load_recipe_data, run
    from slimline.search.nas_search import prepare_search
    from slimline.search.study import completed_trials, open_study, run_worker
    from slimline.stages.search import study_name

    recipe = load_recipe(recipe_path)
    plan = build_plan(recipe)
    searches = [s for s in plan.stages if s.spec.uses == "search.nas"]
    if stage_id is None:
        if len(searches) != 1:
            raise ValueError(f"{recipe.source}: {len(searches)} search.nas stages "
                             f"({', '.join(s.id for s in searches) or 'none'}); pick one with "
                             "--stage")
        stage = searches[0]
    else:
        stage = next((s for s in searches if s.id == stage_id), None)
        if stage is None:
            raise ValueError(f"{recipe.source}: no search.nas stage {stage_id!r} (found: "
                             f"{', '.join(s.id for s in searches) or 'none'})")
    params = stage.params
    storage = storage or params.storage
    if not storage:
        raise ValueError(
            f"stage {stage.id!r} keeps its study in a journal file inside its own stage folder, "
            "which other processes cannot join: set `storage:` in the recipe (e.g. "
            "postgresql://user@host/db or an absolute journal path) or pass --storage")
    keys = {r.id: r.key for r in run(recipe, run_dir=run_dir, dry_run=True,
                                     progress=False).records}
    teacher = None
    if stage.spec.needs:
        upstream = run(recipe, run_dir=run_dir, until=stage.spec.needs[0], progress=progress)
        teacher = upstream.artifact(stage.spec.needs[0])
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="slimline-worker-") as tmp:
        setup = prepare_search(params, load_recipe_data(recipe),
                               teacher.model if teacher is not None else None, seed=recipe.seed,
                               work_dir=Path(tmp))
        # Same proxies and data as the stage, but a sampler seed of its own: identical seeds
        # in every worker would propose identical architectures.
        sampler_seed = recipe.seed + zlib.crc32(worker_id.encode())
        study = open_study(storage, study_name(stage.id, keys[stage.id]),
                           directions=setup.directions, sampler=setup.sampler(sampler_seed),
                           default_journal=Path(tmp) / "unused.journal")
        summary = run_worker(study, setup.objective(), max_trials=params.trials,
                             worker_id=worker_id)
    return WorkerResult(study.study_name, storage, len(summary.completed),
                        len(completed_trials(study)))
