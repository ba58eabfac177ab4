"""The ``slimline profile MODEL.onnx [MODEL2.onnx ...]`` command (torch-free, like latency)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .graph import atomic_write_bytes
from .latency import compare_table, profile_onnx


def add_profile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``slimline profile`` arguments to ``parser`` (also used as a CLI subcommand)."""
    add = parser.add_argument
    add("models", nargs="+", metavar="MODEL.onnx", help="ONNX files to profile")
    add("--batch-sizes", type=_int_list, default=[1], metavar="N,N", help="default: 1")
    add("--runs", type=int, default=100, help="timed runs per batch size (default: 100)")
    add("--warmup", type=int, default=10, help="untimed runs first (default: 10)")
    add("--duration", type=float, metavar="SECONDS", help="time for this long instead of --runs")
    add("--threads", type=int, default=1, help="intra-op threads, 0 = all (default: 1)")
    add("--inter-threads", type=int, default=1, help="inter-op threads (default: 1)")
    add("--provider", action="append", metavar="NAME", help="execution provider (repeatable)")
    add(
        "--input-shape",
        action="append",
        type=_input_shape,
        metavar="NAME=D0,D1,...",
        help="shape of an input with dynamic non-batch dims (repeatable)",
    )
    add("--json", action="store_true", help="print JSON instead of the table")
    add("--output", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    return parser


def main_profile(argv: list[str] | None = None) -> int:
    """``slimline profile MODEL.onnx [MODEL2.onnx ...]``; returns the process exit code.

    Exit code 2 means bad usage or a model that is missing or not loadable; the reason is one
    line on stderr.
    """
    parser = add_profile_arguments(
        argparse.ArgumentParser(
            prog="slimline profile", description="Measure ONNX Runtime latency."
        )
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error
        return int(exc.code or 0)
    return run_profile_command(args)


def run_profile_command(args: argparse.Namespace) -> int:
    """Body of ``slimline profile`` for arguments parsed by :func:`add_profile_arguments`."""
    for model in args.models:  # fail before spending minutes on the first models
        if not Path(model).is_file():
            return _fail(f"ONNX file not found: {model}")
    input_shapes = dict(args.input_shape or [])
    reports = []
    for model in args.models:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                reports.append(
                    profile_onnx(
                        model,
                        batch_sizes=args.batch_sizes,
                        warmup=args.warmup,
                        runs=args.runs,
                        duration_s=args.duration,
                        intra_op_threads=args.threads,
                        inter_op_threads=args.inter_threads,
                        providers=tuple(args.provider or ("CPUExecutionProvider",)),
                        input_shapes=input_shapes,
                    )
                )
            except (OSError, ValueError) as exc:  # OnnxFileError is a ValueError
                return _fail(str(exc))
            finally:
                for warning in caught:
                    print(f"slimline profile: warning: {warning.message}", file=sys.stderr)

    text = json.dumps({"reports": [r.to_dict() for r in reports]}, indent=2)
    if args.output is not None:
        atomic_write_bytes(args.output, (text + "\n").encode("utf-8"))
    print(text if args.json else compare_table(reports))
    return 0


def _fail(message: str) -> int:
    print(f"slimline profile: error: {message}", file=sys.stderr)
    return 2


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _input_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,..., got {text!r}")
    try:
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer dimensions, got {text!r}") from None

