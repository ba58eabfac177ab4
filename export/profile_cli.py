"""The ``slimline profile`` command (torch-free, like latency).

``slimline profile A.onnx [B.onnx | saved.json ...]`` times models and compares them;
``slimline profile lut SPACE.yaml|BLOCKS_DIR -o lut.json`` builds a latency lookup table
(:mod:`slimline.export.lut_cli`). Without the ``slimline`` package: ``python -m slimline.export ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .compare import compare_table, csv_text
from .graph import OnnxFileError, atomic_write_bytes, graph_summary, load_model
from .int8check import describe_format
from .latency import LatencyReport, profile_onnx
from .opprofile import op_table

DEFAULT_RUNS, DEFAULT_WARMUP = 100, 10

_EPILOG = """\
inputs: ONNX files are measured now; JSON files written by --output are loaded and compared
(reports from different machines are never mixed: they get one table each, with a warning).

lookup table for hardware-aware search:
  slimline profile lut SPACE.yaml -o lut.json          export each distinct block (needs torch)
                                                       and time it here
  slimline profile lut SPACE.yaml --blocks-dir DIR --export-only    on the host, then on the
  slimline profile lut DIR -o lut.json                 device (torch-free; or python -m slimline.export)
  lut uses --runs (default 300 per block), --warmup (default 20), --rounds (default 30),
  --threads, --batch-sizes (one value) and --provider.

exit status: 0 ok, 1 --verify-int8 found int8 results this CPU computes wrongly,
2 bad usage or input (the reason is one line on stderr)."""


def add_profile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``slimline profile`` arguments to ``parser`` (also used as a CLI subcommand)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    add = parser.add_argument
    add(
        "models",
        nargs="+",
        metavar="MODEL",
        help="ONNX files to time, or JSON reports saved with --output; or: lut SPACE|DIR",
    )
    add("--batch-sizes", type=_int_list, default=[1], metavar="N,N", help="default: 1")
    add("--runs", type=int, help=f"timed runs per batch size (default: {DEFAULT_RUNS})")
    add("--warmup", type=int, help=f"untimed runs first (default: {DEFAULT_WARMUP})")
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
    add("--seq-len", type=int, metavar="N",
        help="token models: sequence length of input_ids / attention_mask (dims named 'seq')")
    add(
        "--per-op",
        nargs="?",
        const=10,
        type=int,
        metavar="TOP",
        help="per-op-type time breakdown from onnxruntime's profiler (TOP op types, default 10)",
    )
    add("--per-op-runs", type=int, default=50, help="profiled runs for --per-op (default: 50)")
    add("--require-qdq", action="store_true", help="exit 2 unless every ONNX model is int8 QDQ")
    add(
        "--verify-int8",
        action="store_true",
        help="check that this CPU's fused int8 kernels compute each quantized model as its "
        "QDQ graph says (exit 1 and name the first diverging node if not)",
    )
    add(
        "--inputs",
        type=Path,
        metavar="FILE.npz",
        help="real inputs for --verify-int8 (arrays named like the model inputs); default: random",
    )
    add("--json", action="store_true", help="print JSON instead of the table")
    add("-o", "--output", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    add("--csv", type=Path, metavar="FILE", help="also write one CSV row per model and batch size")
    add("--plot", type=Path, metavar="FILE.png", help="bar chart: median per model/batch, p90 bars")
    lut = parser.add_argument_group("lookup table (profile lut ...)")
    lut.add_argument("--blocks-dir", type=Path, metavar="DIR", help="keep the block ONNX files")
    lut.add_argument("--export-only", action="store_true", help="export blocks, do not time them")
    lut.add_argument("--rounds", type=int, default=30, help="interleaved passes (default: 30)")
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


def run_profile_command(
    args: argparse.Namespace, *, load_space: Callable[[Path], Any] | None = None
) -> int:
    """Body of ``slimline profile`` for arguments parsed by :func:`add_profile_arguments`;
    ``load_space`` is for ``profile lut SPACE.yaml`` (see :func:`.lut_cli.run_lut_command`)."""
    if args.models[0] == "lut":
        from .lut_cli import run_lut_command

        return run_lut_command(args, load_space=load_space)
    lut_only = [f"--{n}" for n in ("blocks_dir", "export_only") if getattr(args, n, None)]
    if lut_only:
        flags = ", ".join(lut_only).replace("_", "-")
        return _fail(
            f"{flags} {'applies' if len(lut_only) == 1 else 'apply'} only to `profile lut`"
        )
    if args.plot is not None:
        from .plot import matplotlib_available

        if not matplotlib_available():
            return _fail("--plot needs matplotlib (pip install matplotlib)")
    try:
        sources = [_classify(Path(model), args.require_qdq) for model in args.models]
    except (OSError, ValueError) as exc:  # fail before spending minutes on the first models
        return _fail(str(exc))

    if args.verify_int8:
        failed = _verify_int8([path for path, loaded in sources if loaded is None], args)
        if isinstance(failed, str):
            return _fail(failed)
    reports: list[LatencyReport] = []
    for path, loaded in sources:
        if loaded is not None:
            reports.extend(loaded)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                reports.append(_profile(path, args))
            except (OSError, ValueError) as exc:  # OnnxFileError is a ValueError
                return _fail(str(exc))
            finally:
                _print_warnings(caught)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = compare_table(reports)
    _print_warnings(caught)
    text = json.dumps({"reports": [r.to_dict() for r in reports]}, indent=2)
    # Everything is rendered before anything is written: a failure leaves no partial outputs.
    outputs: list[tuple[Path, bytes]] = []
    if args.output is not None:
        outputs.append((args.output, (text + "\n").encode("utf-8")))
    if args.csv is not None:
        outputs.append((args.csv, csv_text(reports).encode("utf-8")))
    if args.plot is not None:
        from .plot import latency_png

        try:
            outputs.append((args.plot, latency_png(reports)))
        except (RuntimeError, ValueError) as exc:
            return _fail(f"--plot: {exc}")
    for path, data in outputs:
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            return _fail(f"cannot write {path}: {exc}")
    if args.json:
        print(text)
        return 0
    print(table)
    if args.per_op:
        for report in reports:
            for profile in report.op_profiles:
                print(f"\nper-op breakdown: {report.name}, batch {profile.batch_size}\n")
                print(op_table(profile, top=args.per_op))
    return 1 if args.verify_int8 and failed else 0


def _verify_int8(paths: list[Path], args: argparse.Namespace) -> bool | str:
    """Print one verdict per quantized model; True when any diverges, an error text for bad
    ``--inputs``."""
    import numpy as np

    from .feeds import random_inputs
    from .int8numerics import explain_int8_mismatch, first_divergence
    from .machine import machine_info

    real: dict[str, np.ndarray] | None = None
    if args.inputs is not None:
        try:
            with np.load(args.inputs) as archive:
                real = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as exc:
            return f"--inputs {args.inputs}: {exc}"
    any_failed = False
    for path in paths:
        summary = graph_summary(path)
        if not summary.is_quantized:
            print(f"{path.name}: float model, nothing to verify")
            continue
        try:
            feed = real if real is not None else random_inputs(
                summary.inputs, 8, input_shapes=dict(args.input_shape or []),
                dims={"seq": args.seq_len} if args.seq_len else None
            )
            divergence = first_divergence(path, feed)
        except Exception as exc:  # onnxruntime raises plain exceptions for bad feeds
            return f"--verify-int8 {path}: {exc}"
        if divergence is None:
            print(f"{path.name}: int8 verified: this CPU's fused kernels match the QDQ graph")
            continue
        any_failed = True
        print(f"{path.name}: int8 WRONG here: "
              f"{explain_int8_mismatch(path, feed, machine=machine_info())}")
    return any_failed


def _profile(path: Path, args: argparse.Namespace) -> LatencyReport:
    if args.per_op is not None and (args.per_op < 1 or args.per_op_runs < 1):
        raise ValueError("--per-op TOP and --per-op-runs must be >= 1")
    return profile_onnx(
        path,
        batch_sizes=args.batch_sizes,
        warmup=DEFAULT_WARMUP if args.warmup is None else args.warmup,
        runs=DEFAULT_RUNS if args.runs is None else args.runs,
        duration_s=args.duration,
        intra_op_threads=args.threads,
        inter_op_threads=args.inter_threads,
        providers=tuple(args.provider or ("CPUExecutionProvider",)),
        input_shapes=dict(args.input_shape or []),
        seq_len=args.seq_len,
        per_op=bool(args.per_op),
        per_op_runs=args.per_op_runs,
    )


def _classify(path: Path, require_qdq: bool) -> tuple[Path, list[LatencyReport] | None]:
    """``(path, None)`` for an ONNX file to measure, ``(path, reports)`` for a saved report."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            return path, _load_reports(path)
        except ValueError as exc:
            try:  # a mislabelled ONNX file is still measured
                load_model(path)
            except OnnxFileError:
                raise ValueError(f"{exc} (and it is not an ONNX model either)") from None
    if require_qdq:
        summary = graph_summary(path)
        if summary.quant_format != "qdq":
            raise ValueError(
                f"{path} is not an int8 QDQ model: it is {describe_format(summary)}; "
                "--require-qdq expects QDQ (e.g. from export.ort_quantize)"
            )
    return path, None


def _load_reports(path: Path) -> list[LatencyReport]:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON latency report ({exc})") from None
    items = data.get("reports") if isinstance(data, dict) and "reports" in data else [data]
    try:
        return [LatencyReport.from_dict(item) for item in items]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path} is not a latency report written by `slimline profile --output` ({exc!r})"
        ) from None


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for warning in caught:
        print(f"slimline profile: warning: {warning.message}", file=sys.stderr)


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
        values = [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer dimensions, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return name, values
