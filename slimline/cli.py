"""The ``slimline`` command: run, validate, stages, models, datasets, profile."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from slimline import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for a user (no traceback)."""
    from slimline.artifact import CheckpointError
    from slimline.recipe import RecipeError
    from slimline.registry import UnknownNameError
    from slimline.runner import RunDirError
    from slimline.stage import StageFailed

    return (RecipeError, StageFailed, CheckpointError, RunDirError, UnknownNameError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if os.environ.get("SLIMLINE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimline", description="Make trained PyTorch models small and fast.")
    parser.add_argument("--version", action="version", version=f"slimline {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run a recipe (cached, resumable)")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("--run-dir", help="where outputs go (default: runs/<recipe name>)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="recompute STAGE and everything after it ('all' for every stage)")
    run.add_argument("--until", metavar="STAGE", help="stop after STAGE (and what it needs)")
    run.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    run.add_argument("--target", metavar="CPU",
                     help="the CPU the int8 files are for, overriding the recipe's `target:` "
                          "(auto: this machine; x86-avx2, x86-avx512, x86-vnni, x86-amx, "
                          "arm64-dot, arm64, portable)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    run.set_defaults(handler=_cmd_run)

    validate = commands.add_parser("validate", help="check a recipe and print its plan")
    validate.add_argument("recipe")
    validate.set_defaults(handler=_cmd_validate)

    stages = commands.add_parser("stages", help="list stages, or show one stage's parameters")
    stages.add_argument("name", nargs="?")
    stages.set_defaults(handler=_cmd_stages)

    models = commands.add_parser("models", help="list reference models")
    models.add_argument("pattern", nargs="?", default="*", help="glob, e.g. 'resnet*'")
    models.set_defaults(handler=_cmd_models)

    datasets = commands.add_parser("datasets", help="list datasets")
    datasets.set_defaults(handler=_cmd_datasets)

    search = commands.add_parser("search", help="architecture search tools")
    search_commands = search.add_subparsers(dest="search_command", metavar="SUBCOMMAND",
                                            required=True)
    worker = search_commands.add_parser(
        "worker", help="join a recipe's search.nas study as one more worker process")
    worker.add_argument("recipe", help="recipe YAML file")
    worker.add_argument("--storage", help="Optuna storage URL (default: the stage's `storage`), "
                        "e.g. postgresql://user@host/db")
    worker.add_argument("--stage", help="search.nas stage id (if the recipe has several)")
    worker.add_argument("--run-dir", help="where upstream stages are cached (default: "
                        "runs/<recipe name>)")
    worker.add_argument("--worker-id", help="name recorded on this worker's trials")
    worker.set_defaults(handler=_cmd_search_worker)

    from slimline.export.profile_cli import add_profile_arguments

    profile = commands.add_parser("profile", help="time ONNX models with onnxruntime")
    add_profile_arguments(profile)
    profile.set_defaults(handler=_cmd_profile)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from slimline.runner import run

    result = run(args.recipe, run_dir=args.run_dir, force=args.force, until=args.until,
                 dry_run=args.dry_run, progress=not args.no_progress, target=args.target)
    if args.dry_run:
        from slimline.dag import build_plan

        _print_plan(build_plan(result.recipe), {r.id: r for r in result.records})
        return 0
    ran = len(result.ran)
    print(f"{result.recipe.name}: {ran} stage(s) ran, "
          f"{sum(r.status == 'cached' for r in result.records)} cached -> {result.run_dir} "
          f"(target {result.target.name})")
    if result.report_path:
        print(f"report: {result.report_path}")
    return 0


def _cmd_search_worker(args: argparse.Namespace) -> int:
    from slimline.search.study import StudyStorageError
    from slimline.search_worker import run_search_worker

    try:
        result = run_search_worker(args.recipe, stage_id=args.stage, storage=args.storage,
                                   run_dir=args.run_dir, worker_id=args.worker_id)
    except (ValueError, StudyStorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{result.study_name}: this worker ran {result.trials_run} trial(s); the study holds "
          f"{result.complete} complete")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from slimline.api import validate

    plan = validate(args.recipe)
    print(f"{args.recipe}: valid ({len(plan.stages)} stages)")
    _print_plan(plan, {})
    return 0


def _print_plan(plan, records: dict) -> None:
    rows = []
    for position, stage in enumerate(plan.stages, 1):
        defaults = {f.name: _default(f) for f in dataclasses.fields(stage.params)}
        changed = {k: v for k, v in stage.params_dict().items() if defaults.get(k) != v}
        record = records.get(stage.id)
        rows.append((str(position), stage.id, stage.spec.uses,
                     ",".join(stage.dependencies) or "(model)",
                     record.status if record else "", record.key[:12] if record else "",
                     " ".join(f"{k}={v}" for k, v in changed.items())))
    header = ("#", "stage", "uses", "needs", "status", "key", "params")
    _print_table(header, rows)


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    keep = [i for i in range(len(header)) if any(row[i] for row in rows) or i < 2]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in keep]
    print("  ".join(header[i].ljust(w) for i, w in zip(keep, widths)).rstrip())
    for row in rows:
        print("  ".join(row[i].ljust(w) for i, w in zip(keep, widths)).rstrip())


def _cmd_stages(args: argparse.Namespace) -> int:
    from slimline.stage import get_stage, list_stages

    if args.name:
        stage = get_stage(args.name)
        print(f"{stage.name}: {stage.doc}\n")
        _print_table(("param", "type", "default", "help"), stage.describe())
        return 0
    _print_table(("stage", "description"), [(s.name, s.doc) for s in list_stages()])
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from slimline.models import MODELS, describe_models

    names = set(MODELS.names(args.pattern))
    _print_table(("model", "description"), [r for r in describe_models() if r[0] in names])
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from slimline.data import describe_datasets

    _print_table(("dataset", "description"), describe_datasets())
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from slimline.export.profile_cli import run_profile_command

    def load_space(path: object) -> object:  # search sits above export: handed down
        from slimline.search.space_loading import load_space

        return load_space(path)

    return run_profile_command(args, load_space=load_space)


if __name__ == "__main__":
    sys.exit(main())
