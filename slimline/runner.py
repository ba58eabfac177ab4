"""Run a plan: each stage once, cached by content hash, resumable after any kill.

Layout of a run directory::

    run.json                     plan, keys, per-stage status and timings, versions
    report.md, report.png        written at the end of every run
    stages/<id>-<key12>/         one finished stage output (see slimline.artifact)

A stage writes into ``stages/.tmp-<id>-<key12>-<pid>/`` and that directory is renamed into place
only after the artifact is complete, so a run killed mid-stage (SIGINT or SIGKILL) leaves every
finished stage intact and the next run resumes from there.

Under ``torchrun`` every rank computes every stage (training shards its batches across ranks)
but only rank 0 takes the lock and writes; after rank 0 has saved a stage, the other ranks load
it from disk, exactly as they would a cache hit, so all ranks continue from the same weights
(see :mod:`slimline.distributed`). The run directory must be visible to every rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimline import __version__
from slimline.artifact import (
    Artifact,
    build_model_from_spec,
    count_parameters,
    load_tensor_file,
    load_weights,
    state_dict_from_checkpoint,
)
from slimline.dag import Plan, PlannedStage, build_plan, stage_keys
from slimline.data import Dataset, load_dataset
from slimline.distributed import RankGroup, rank_group
from slimline.export.machine import machine_info
from slimline.export.target import Target, resolve_target
from slimline.io import canonical_json, read_json, sha256_file, sha256_text, write_json
from slimline.recipe import Recipe, check_target, load_recipe
from slimline.stage import StageContext, StageFailed, seed_everything
from slimline.versions import versions

log = logging.getLogger("slimline")


class RunDirError(RuntimeError):
    """The run directory cannot be used (not writable, or locked by another run)."""


@dataclass
class StageRecord:
    id: str
    uses: str
    key: str
    directory: Path
    status: str  # "ran" | "cached" | "skipped" | "pending"
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    parent_model_id: str | None = None
    onnx_source: str | None = None  # the stage whose ONNX file this output measured or carries


@dataclass
class RunResult:
    recipe: Recipe
    run_dir: Path
    records: list[StageRecord]
    report_path: Path | None = None
    plot_path: Path | None = None
    target: Target = field(default_factory=lambda: resolve_target("auto"))

    def record(self, stage_id: str) -> StageRecord:
        return next(r for r in self.records if r.id == stage_id)

    def artifact(self, stage_id: str) -> Artifact:
        """Load a finished stage's output (model included)."""
        return Artifact.load(self.record(stage_id).directory)

    @property
    def ran(self) -> list[str]:
        return [r.id for r in self.records if r.status == "ran"]


def run(recipe: str | Path | dict | Recipe, *, run_dir: str | Path | None = None,
        force: tuple[str, ...] | list[str] = (), until: str | None = None,
        dry_run: bool = False, progress: bool = True, target: str | None = None) -> RunResult:
    """Run a recipe (file, dict or parsed) and return what each stage did.

    ``force``: stage ids to recompute (with everything downstream of them); ``"all"`` for all.
    ``until``: run only this stage and what it depends on. ``dry_run``: plan and report cache
    status without running anything. ``target``: the CPU the int8 files are for, overriding
    the recipe's ``target:`` (see :mod:`slimline.export.target`).
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if target is not None:
        recipe.target = check_target(recipe, target, key="--target")
    resolved = resolve_target(recipe.target)
    plan = build_plan(recipe)
    selected = plan.ancestors(_known(plan, until)) if until else {s.id for s in plan.stages}
    forced: set[str] = set()
    for stage_id in force:
        forced |= ({s.id for s in plan.stages} if stage_id == "all"
                   else plan.descendants(_known(plan, stage_id)))
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / recipe.name
    dataset = load_recipe_data(recipe)
    source = _source_artifact(recipe, dataset)
    source_key = sha256_text(canonical_json({
        "model": source.model_spec, "checkpoint": source.state.get("checkpoint_sha256"),
        "data": recipe.data, "data_sha256": dataset.fingerprint(), "seed": recipe.seed}))
    keys = stage_keys(plan, source_key, __version__, resolved.name)
    records = [StageRecord(s.id, s.spec.uses, keys[s.id],
                           run_dir / "stages" / f"{s.id}-{keys[s.id][:12]}", "pending")
               for s in plan.stages]
    for record in records:
        if record.id not in selected:
            record.status = "skipped"
        elif (record.directory / "artifact.json").exists() and record.id not in forced:
            record.status = "cached"
    result = RunResult(recipe, run_dir, records, target=resolved)
    if dry_run:
        return result
    with rank_group() as group, contextlib.ExitStack() as held:
        group.attempt("opening the run directory",
                      lambda: held.enter_context(_locked_run_dir(run_dir)), writer_only=True)
        # Rank 0 holds the lock, so its view of the cache is the one every rank follows.
        for record, status in zip(records, group.share([r.status for r in records])):
            record.status = status
        _execute(plan, result, source, dataset, forced, progress, group)
    return result


def _known(plan: Plan, stage_id: str) -> str:
    plan.get(stage_id)  # raises with the list of stages
    return stage_id


def load_recipe_data(recipe: Recipe) -> Dataset:
    """The recipe's dataset; a :class:`RecipeError` at ``data`` when it cannot be loaded."""
    spec = recipe.data
    try:
        return load_dataset(spec.get("name"), factory=spec.get("factory"), **spec["with"])
    except (TypeError, ValueError, KeyError) as exc:
        raise recipe.error(f"cannot load dataset: {exc}", "data") from None


def _source_artifact(recipe: Recipe, dataset: Dataset) -> Artifact:
    """The model the first stage starts from: built from the zoo, a factory or a Hugging Face
    checkpoint, maybe loaded from ``checkpoint``."""
    keys = ("name", "factory", "hf", "hf_config", "task", "with")
    spec = {k: v for k, v in recipe.model.items() if k in keys}
    spec["with"] = dict(spec.get("with") or {})
    if "name" in spec:
        from slimline.models import MODELS

        try:
            builder = MODELS.get(spec["name"])
        except KeyError as exc:
            raise recipe.error(str(exc), "model.name") from None
        accepted = inspect.signature(builder).parameters
        # Fill the shape arguments from the dataset unless the recipe pins them.
        filled: tuple[tuple[str, Any], ...] = (("num_classes", dataset.num_classes),
                                               ("in_channels", dataset.in_channels),
                                               ("input_size", list(dataset.input_size)))
        if dataset.input_spec.is_tokens:  # token models: the vocabulary, not channels
            vocab = max(high for _, high in dataset.input_spec.id_ranges)
            filled = (("num_classes", dataset.num_classes), ("vocab_size", vocab),
                      ("max_length", dataset.input_shape[0]))
        for name, value in filled:
            if name in accepted:
                spec["with"].setdefault(name, value)
    seed_everything(recipe.seed)  # the initial weights are part of what the seed pins down
    try:
        model = build_model_from_spec(spec)
    except (TypeError, ValueError) as exc:
        raise recipe.error(f"cannot build the model: {exc}", "model") from None
    state: dict[str, Any] = {}
    checkpoint = recipe.model.get("checkpoint")
    if checkpoint:
        payload = load_tensor_file(checkpoint)
        load_weights(model, state_dict_from_checkpoint(payload, checkpoint), source=checkpoint)
        state["checkpoint_sha256"] = sha256_file(checkpoint)
    if "hf" in spec:  # the weights are part of the source: hash them like a checkpoint
        from slimline.models.hf import resolve_hf_path

        state["checkpoint_sha256"] = sha256_text("".join(
            sha256_file(f) for f in sorted(resolve_hf_path(spec["hf"]).iterdir())
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json")))
    return Artifact(model=model, model_spec=spec, input_shape=dataset.input_shape, state=state,
                    model_id="source", input_spec=dataset.input_spec)


@contextlib.contextmanager
def _locked_run_dir(run_dir: Path) -> Iterator[None]:
    try:
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "w")  # noqa: SIM115 (held for the whole run)
    except OSError as exc:
        raise RunDirError(f"run directory {run_dir} is not writable: {exc.strerror or exc}. "
                          "Choose another with --run-dir.") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise RunDirError(f"another slimline run is using {run_dir}; wait for it or choose "
                          "another --run-dir") from None
    try:
        # Leftovers of runs killed mid-stage: never complete, safe to drop under the lock.
        for stale in (run_dir / "stages").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _execute(plan: Plan, result: RunResult, source: Artifact, dataset: Dataset,
             forced: set[str], progress: bool, group: RankGroup) -> None:
    from slimline.report import write_report

    records = {r.id: r for r in result.records}
    loaded: dict[str, Artifact] = {"source": source}
    info = log.info if group.is_writer else (lambda *args: None)

    def artifact_of(stage_id: str) -> Artifact:
        if stage_id not in loaded:
            loaded[stage_id] = Artifact.load(records[stage_id].directory)
        return loaded[stage_id]

    active = [r for r in result.records if r.status != "skipped"]
    group.attempt("writing run.json", lambda: _write_run_json(result), writer_only=True)
    for stage in plan.stages:
        record = records[stage.id]
        if record.status == "skipped":
            continue
        counter = f"[{active.index(record) + 1}/{len(active)}]"
        if record.status == "cached":
            group.attempt(f"reading cached stage {stage.id!r}",
                          lambda record=record: _read_cached(record, group))
            info("%s %s (%s): cached", counter, stage.id, stage.spec.uses)
            continue
        info("%s %s (%s): running", counter, stage.id, stage.spec.uses)
        started = time.perf_counter()
        output = group.attempt(
            f"stage {stage.id!r}",
            lambda stage=stage, record=record: _run_stage(
                plan, stage, record, source, dataset, artifact_of, progress, group,
                result.target))
        # Every rank takes part in every exchange; the others continue from what rank 0 saved.
        output = group.attempt(
            f"loading stage {stage.id!r} as saved by rank 0",
            lambda record=record, output=output: output if group.is_writer
            else _load_saved(record, group))
        assert output is not None  # attempt raised otherwise
        loaded[stage.id] = output
        record.status, record.seconds = "ran", time.perf_counter() - started
        record.metrics = output.metrics
        record.model_id, record.parent_model_id = output.model_id, output.parent_model_id
        record.onnx_source = output.state.get("onnx_source")
        group.attempt("writing run.json", lambda: _write_run_json(result), writer_only=True)
        info("%s %s: done in %.1fs%s", counter, stage.id, record.seconds,
             _headline(output.metrics))
    if group.is_writer:
        result.report_path, result.plot_path = write_report(result)
    group.agree("writing the report", None)  # no rank exits while rank 0 still writes


def _run_stage(plan: Plan, stage: PlannedStage, record: StageRecord, source: Artifact,
               dataset: Dataset, artifact_of: Any, progress: bool, group: RankGroup,
               target: Target) -> Artifact:
    """Compute one stage; rank 0 saves it into place, other ranks work in a private temp dir."""
    inputs = [artifact_of(dep) for dep in stage.spec.needs] or [source]
    if group.is_writer:
        work_dir = record.directory.parent / f".tmp-{record.directory.name}-{os.getpid()}"
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
    else:
        work_dir = Path(tempfile.mkdtemp(prefix=f"slimline-rank{group.rank}-{stage.id}-"))
    context = StageContext(
        stage_id=stage.id, uses=stage.spec.uses, work_dir=work_dir,
        seed=int(sha256_text(f"{plan.recipe.seed}:{stage.id}")[:8], 16),
        data_loader=lambda: dataset,
        references={name: artifact_of(target) for name, target in stage.refs.items()},
        lookup=lambda stage_id: source if stage_id == "source" else artifact_of(stage_id),
        show_progress=progress and group.is_writer, cache_key=record.key,
        target=target)
    try:
        seed_everything(context.seed)  # the same on every rank: they walk the same batches
        output = _call_stage(stage, context, inputs)
        if not group.is_writer:
            return output
        _finish_artifact(output, inputs[0], stage.id, stage.spec.uses)
        output.save(work_dir)
        if record.directory.exists():  # --force: replace the old output
            shutil.rmtree(record.directory)
        os.replace(work_dir, record.directory)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    output.files = {name: record.directory / Path(path).name
                    for name, path in output.files.items()}
    return output


def _read_cached(record: StageRecord, group: RankGroup) -> None:
    meta_path = record.directory / "artifact.json"
    if not meta_path.exists() and not group.is_writer:
        raise RunDirError(_invisible(record, group))
    meta = read_json(meta_path)
    record.metrics, record.model_id = meta["metrics"], meta["model_id"]
    record.parent_model_id = meta["parent_model_id"]
    record.onnx_source = meta["state"].get("onnx_source")


def _load_saved(record: StageRecord, group: RankGroup) -> Artifact:
    if not (record.directory / "artifact.json").exists():
        raise RunDirError(_invisible(record, group))
    return Artifact.load(record.directory)


def _invisible(record: StageRecord, group: RankGroup) -> str:
    return (f"rank {group.rank} cannot see {record.directory}, which rank 0 wrote; every rank "
            "must see the run directory (one machine, or --run-dir on a shared filesystem)")


def _call_stage(stage: PlannedStage, context: StageContext, inputs: list[Artifact]) -> Artifact:
    try:
        output = stage.definition.function(context, inputs, stage.params)
    except (StageFailed, KeyboardInterrupt):
        raise
    except Exception as exc:
        if os.environ.get("SLIMLINE_DEBUG"):
            raise
        # Known error types from our own libraries carry user-facing messages already.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = _innermost_frame(exc)
        raise StageFailed(f"stage {stage.id!r} ({stage.spec.uses}) failed: "
                          f"{type(exc).__name__}: {message}{where}. "
                          "Set SLIMLINE_DEBUG=1 for the full traceback.") from exc
    if not isinstance(output, Artifact):
        raise StageFailed(f"stage {stage.id!r} ({stage.spec.uses}) returned "
                          f"{type(output).__name__}, not an Artifact")
    return output


def _innermost_frame(exc: BaseException) -> str:
    """`` (at udfc.py:149)``: the deepest frame that runs slimline's own code, found by the
    module name of each frame (``slimline`` and its subpackages), not by file paths."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module == "slimline" or module.startswith("slimline."):
            where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
        tb = tb.tb_next
    return where


def _finish_artifact(output: Artifact, first_input: Artifact, stage_id: str, uses: str) -> None:
    """Lineage and the metrics every stage output carries."""
    if output.model is not first_input.model:  # the stage made a new model: it is the parent now
        output.model_id, output.parent_model_id = stage_id, first_input.model_id
        output.state.pop("onnx_source", None)
    if "onnx" in output.files:  # derive() drops files, so an ONNX file here is this stage's own
        output.state["onnx_source"] = stage_id
    total, nonzero = count_parameters(output.model)
    output.metrics.setdefault("parameters", total)
    output.metrics.setdefault("nonzero_parameters", nonzero)
    output.history.append({"stage": stage_id, "uses": uses, "metrics": output.metrics})


def _headline(metrics: dict[str, Any]) -> str:
    shown = []
    for key in ("accuracy", "val_accuracy", "sparsity", "max_abs_diff", "median_ms"):
        if isinstance(metrics.get(key), (int, float)):
            shown.append(f"{key}={metrics[key]:.4g}")
    return f" ({', '.join(shown)})" if shown else ""


def _write_run_json(result: RunResult) -> None:
    write_json(result.run_dir / "run.json", {
        "recipe": result.recipe.name,
        "source": result.recipe.source,
        "seed": result.recipe.seed,
        "target": result.target.to_dict(),
        "machine": machine_info(),
        "versions": versions(),
        "stages": [{"id": r.id, "uses": r.uses, "key": r.key, "status": r.status,
                    "seconds": round(r.seconds, 3), "directory": r.directory.name,
                    "model_id": r.model_id, "parent_model_id": r.parent_model_id,
                    "onnx_source": r.onnx_source,
                    "metrics": r.metrics} for r in result.records],
    })
