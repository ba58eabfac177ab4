"""``slimline profile lut SPACE.yaml|BLOCKS_DIR -o lut.json``: build a latency lookup table.

From a search space YAML it exports every distinct block with torch (into ``--blocks-dir`` or a
temporary folder) and times the blocks here. From a blocks folder (written on another machine
with ``--export-only``) it only times them, which needs no torch: copy the folder to the
deployment device and run ``python -m slimline.export lut DIR -o lut.json`` there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .compare import markdown_table
from .lut import LatencyTable, LutError, measure_lut

DEFAULT_RUNS, DEFAULT_WARMUP = 300, 20


def run_lut_command(
    args: argparse.Namespace, *, load_space: Callable[[Path], Any] | None = None
) -> int:
    """``profile lut`` for arguments parsed by :func:`slimline.export.profile_cli.add_profile_arguments`.

    ``load_space`` reads a search space file; the ``slimline`` CLI passes
    :func:`slimline.search.space_loading.load_space`. Without it (``python -m slimline.export`` on a
    device) only blocks folders are accepted: this package sits below the search code.
    """
    if len(args.models) != 2:
        return _fail("usage: slimline profile lut SPACE.yaml|BLOCKS_DIR -o lut.json")
    not_for_lut = {
        "--csv": args.csv,
        "--plot": args.plot,
        "--per-op": args.per_op,
        "--input-shape": args.input_shape,
        "--json": args.json,
        "--require-qdq": args.require_qdq,
        "--duration": args.duration,
    }
    given = [flag for flag, value in not_for_lut.items() if value]
    if given:
        return _fail(f"{', '.join(given)} do not apply to `profile lut`")
    if len(args.batch_sizes) != 1:
        return _fail("a lookup table is for one batch size: give --batch-sizes N")
    runs = DEFAULT_RUNS if args.runs is None else args.runs
    warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    if runs < 1 or warmup < 0 or args.rounds < 1 or args.threads < 0:
        return _fail("--runs and --rounds must be >= 1, --warmup and --threads >= 0")
    if args.output is None and not args.export_only:
        return _fail("give the table's file with -o lut.json (or --export-only)")
    if args.export_only and args.blocks_dir is None:
        return _fail("--export-only needs --blocks-dir DIR to keep the blocks in")

    target = Path(args.models[1])
    if not target.exists():
        return _fail(f"not found: {target}")
    with tempfile.TemporaryDirectory(prefix="slimline-lut-") as scratch:
        if target.is_dir():
            if args.export_only:
                return _fail(f"{target} is already a blocks folder; --export-only needs a space")
            blocks_dir = target
        else:
            blocks_dir = args.blocks_dir or Path(scratch)
            status = _export(target, blocks_dir, args.batch_sizes[0], load_space)
            if status:
                return status
            if args.export_only:
                print(
                    f"blocks and manifest written to {blocks_dir}; time them on the device "
                    f"with: slimline profile lut {blocks_dir} -o lut.json"
                )
                return 0
        _note(
            f"timing blocks in {blocks_dir} ({runs} runs each, {args.rounds} rounds, "
            f"{args.threads} thread(s))"
        )
        try:
            table = measure_lut(
                blocks_dir,
                warmup=warmup,
                runs=runs,
                rounds=args.rounds,
                threads=args.threads,
                providers=tuple(args.provider or ("CPUExecutionProvider",)),
            )
        except (LutError, OSError) as exc:
            return _fail(str(exc))
    try:
        table.save(args.output)
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc}")
    print(summary(table, args.output))
    return 0


def summary(table: LatencyTable, path: Path | str) -> str:
    """What was written: entry count, overhead, and the slowest blocks."""
    entries = sorted(table.entries.values(), key=lambda e: -e.ms)
    rows = [("block", "ms (overhead removed)", "median ms", "p90 ms")]
    rows += [(e.key, f"{e.ms:.4f}", f"{e.median_ms:.4f}", f"{e.p90_ms:.4f}") for e in entries[:8]]
    space = table.meta.get("space", {}).get("name", "?")
    return (
        f"wrote {path}: {len(entries)} blocks of space {space!r}, batch {table.batch_size}, "
        f"{table.threads} thread(s); fixed per-run overhead {table.overhead_ms:.4f} ms "
        f"(added once per prediction)\n\n"
        + markdown_table(rows)
        + (f"\n({len(entries) - 8} more)" if len(entries) > 8 else "")
    )


def _export(space_file: Path, blocks_dir: Path, batch_size: int,
            load_space: Callable[[Path], Any] | None) -> int:
    if load_space is None:
        return _fail(
            f"{space_file} is a search space: exporting its blocks needs the full slimline "
            f"(`slimline profile lut {space_file} --blocks-dir DIR --export-only` on a host "
            "with torch); here give the blocks folder"
        )
    try:
        space = load_space(space_file)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    try:
        from .lut_blocks import export_space_blocks
    except ImportError as exc:
        return _fail(
            f"building blocks from a search space needs torch ({exc}); run `slimline profile lut "
            f"{space_file} --blocks-dir DIR --export-only` on a host with torch, copy DIR here "
            "and run `slimline profile lut DIR -o lut.json`"
        )
    try:
        count = len(space.distinct_blocks())
    except ValueError as exc:  # spaces without a block decomposition (ViT, sequence models)
        return _fail(f"{space_file}: {exc}; time whole candidates instead (search.nas "
                     "latency: measure)")
    _note(f"exporting {count} distinct blocks of space {space.name!r} to {blocks_dir}")
    try:
        export_space_blocks(space, blocks_dir, batch_size=batch_size)
    except (OSError, ValueError, RuntimeError) as exc:
        return _fail(f"exporting the blocks of {space_file} failed: {exc}")
    return 0


def _note(message: str) -> None:
    print(f"slimline profile lut: {message}", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"slimline profile lut: error: {message}", file=sys.stderr)
    return 2
