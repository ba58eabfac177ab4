"""Latency profiling of ONNX models with ONNX Runtime, and the ``slimline profile`` command.

Importable without torch (numpy + onnxruntime + stdlib only) so it runs on deployment hosts.
"""

from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .graph import OnnxFileError, TensorInfo, random_inputs

__all__ = [
    "BatchLatency",
    "LatencyReport",
    "compare_table",
    "machine_info",
    "profile_onnx",
]

MIN_TIMED_RUNS = 5  # with duration_s, percentiles of fewer samples are meaningless
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_DTYPES = {  # ONNX Runtime's type strings -> numpy names used by TensorInfo
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}
# CPU features that decide int8 kernel speed; "asimddp" is Arm's dot product (SDOT/UDOT).
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


@dataclass(frozen=True)
class BatchLatency:
    """Latency statistics of one batch size. Times are per ``session.run`` call, in ms.

    ``throughput`` is samples per second derived from the median. The raw timings are kept in
    ``samples_ms`` (left out of :meth:`to_dict` unless asked for) for CSV export or plots.
    """

    batch_size: int
    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    throughput: float
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_samples(cls, batch_size: int, samples_ms: Sequence[float]) -> BatchLatency:
        """Statistics of the timings ``samples_ms`` (at least one)."""
        if not samples_ms:
            raise ValueError("at least one timing sample is needed")
        data = np.asarray(samples_ms, dtype=np.float64)
        # One np.percentile call with linear interpolation keeps the quantiles monotone.
        median, p90, p99 = (float(q) for q in np.percentile(data, [50, 90, 99]))
        return cls(
            batch_size=batch_size,
            runs=len(data),
            median_ms=median,
            p90_ms=p90,
            p99_ms=p99,
            min_ms=float(data.min()),
            mean_ms=float(data.mean()),
            std_ms=float(data.std(ddof=1)) if len(data) > 1 else 0.0,
            throughput=batch_size / (median / 1000.0) if median > 0 else float("inf"),
            samples_ms=tuple(float(x) for x in data),
        )

    def to_dict(self, *, include_samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        samples = data.pop("samples_ms")
        if include_samples:
            data["samples_ms"] = list(samples)
        return data


@dataclass(frozen=True)
class LatencyReport:
    """Everything :func:`profile_onnx` measured for one model, plus where it was measured."""

    model: str
    file_bytes: int
    providers: tuple[str, ...]  # what actually ran, in ONNX Runtime's priority order
    requested_providers: tuple[str, ...]
    intra_op_threads: int
    inter_op_threads: int
    graph_optimization: str
    warmup: int
    batches: tuple[BatchLatency, ...]
    machine: dict[str, Any]

    @property
    def name(self) -> str:
        return Path(self.model).name

    def batch(self, batch_size: int) -> BatchLatency | None:
        return next((b for b in self.batches if b.batch_size == batch_size), None)

    def to_dict(self, *, include_samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict; ``include_samples`` adds every raw timing."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data |= {k: list(data[k]) for k in ("providers", "requested_providers")}
        data["batches"] = [b.to_dict(include_samples=include_samples) for b in self.batches]
        data["machine"] = dict(self.machine)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyReport:
        """Inverse of :meth:`to_dict`, e.g. to compare against a saved report."""
        batches = tuple(
            BatchLatency(**(b | {"samples_ms": tuple(b.get("samples_ms", ()))}))
            for b in data["batches"]
        )
        tuples = {"providers", "requested_providers"}
        values = {k: tuple(v) if k in tuples else v for k, v in data.items() if k != "batches"}
        return cls(**values, batches=batches)


def profile_onnx(
    path: str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 10,
    runs: int = 100,
    duration_s: float | None = None,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    graph_optimization: str = "all",
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> LatencyReport:
    """Measure ONNX Runtime latency of the model at ``path`` for each batch size.

    Inputs are random tensors from the model's input metadata (see
    :func:`export.graph.random_inputs`): a dynamic dimension 0 is the batch size; other dynamic
    dimensions must be given by ``input_shapes``.

    Each batch size gets ``warmup`` untimed runs, then ``runs`` timed runs, or, with
    ``duration_s``, as many as fit in that time (``runs`` is then ignored, minimum
    :data:`MIN_TIMED_RUNS`). ``intra_op_threads``/``inter_op_threads`` of 0 let ONNX Runtime
    choose. Unavailable providers are dropped with a warning; CPU is always the last fallback.

    Raises:
        FileNotFoundError: no file at ``path``.
        OnnxFileError: ONNX Runtime cannot load the file.
        ValueError: bad arguments, or an input shape that cannot be determined.
    """
    path = Path(path)
    _validate(batch_sizes, warmup, runs, duration_s, intra_op_threads, inter_op_threads)
    if graph_optimization not in _OPT_LEVELS:
        raise ValueError(
            f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, got {graph_optimization!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = _OPT_LEVELS[graph_optimization]
    options.log_severity_level = 3  # errors only: node-placement warnings would spam the CLI
    session = _create_session(path, options, _usable_providers(providers))

    rng = np.random.default_rng(seed)
    signature = [
        TensorInfo(arg.name, tuple(arg.shape), _ORT_DTYPES.get(arg.type, arg.type))
        for arg in session.get_inputs()
    ]
    results = []
    for batch_size in batch_sizes:
        feeds = random_inputs(signature, batch_size, input_shapes=input_shapes, rng=rng)
        for _ in range(warmup):
            session.run(None, feeds)
        results.append(
            BatchLatency.from_samples(batch_size, _time_runs(session, feeds, runs, duration_s))
        )

    return LatencyReport(
        model=str(path),
        file_bytes=path.stat().st_size,
        providers=tuple(session.get_providers()),
        requested_providers=tuple(providers),
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        graph_optimization=graph_optimization,
        warmup=warmup,
        batches=tuple(results),
        machine=machine_info(),
    )


def machine_info() -> dict[str, Any]:
    """Where a measurement was taken: CPU, core counts, int8-relevant ISA flags, versions."""
    return dict(_machine_info())  # a copy: callers may annotate their report's dict


@functools.lru_cache(maxsize=1)
def _machine_info() -> dict[str, Any]:
    cpuinfo = _read_cpuinfo()
    cpu = next(
        (cpuinfo[k] for k in ("model name", "Hardware", "Processor") if cpuinfo.get(k)),
        platform.processor() or platform.machine(),
    )
    flags = set((cpuinfo.get("flags") or cpuinfo.get("Features") or "").split())
    try:
        available_cores: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        available_cores = os.cpu_count()
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        # What this process may use (containers, taskset); can be lower than logical_cores.
        "available_cores": available_cores,
        "isa_flags": [flag for flag in _ISA_FLAGS if flag in flags],
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _read_cpuinfo() -> dict[str, str]:
    """First value of each key in /proc/cpuinfo (all cores report the same model and flags)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in info:
                    info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def compare_table(reports: Sequence[LatencyReport]) -> str:
    """Markdown table, one row per (model, batch size).

    ``vs first`` is this model's median divided by the first report's median at the same
    batch size: 0.50x means twice as fast as the first model, "-" means the first model was
    not measured at that batch size.
    """
    if not reports:
        return ""
    names = [r.name for r in reports]
    if len(set(names)) < len(names):  # same file name in different folders
        names = [r.model for r in reports]
    baseline = {b.batch_size: b.median_ms for b in reports[0].batches}
    header = ("model", "size", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "vs first")
    rows = [header]
    for name, report in zip(names, reports, strict=True):
        size = _format_bytes(report.file_bytes)
        for b in report.batches:
            base = baseline.get(b.batch_size)
            ratio = f"{b.median_ms / base:.2f}x" if base else "-"
            times = (f"{t:.3f}" for t in (b.median_ms, b.p90_ms, b.p99_ms))
            rows.append((name, size, str(b.batch_size), *times, f"{b.throughput:.1f}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # Column 0 (model) left-aligned, the numbers right-aligned: markdown's ":" on the right.
    lines = [
        "| "
        + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        + " |"
        for row in rows
    ]
    rule = (
        "|"
        + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([lines[0], rule, *lines[1:]])


# --- helpers ---------------------------------------------------------------------------------


def _validate(
    batch_sizes: Sequence[int],
    warmup: int,
    runs: int,
    duration_s: float | None,
    intra_op_threads: int,
    inter_op_threads: int,
) -> None:
    if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if duration_s is None and runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if intra_op_threads < 0 or inter_op_threads < 0:
        raise ValueError("thread counts must be >= 0 (0 = onnxruntime default)")


def _usable_providers(requested: Sequence[str]) -> list[str]:
    available = ort.get_available_providers()
    usable = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        warnings.warn(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
            f"build (available: {', '.join(available)}); falling back to CPUExecutionProvider",
            RuntimeWarning,
            stacklevel=3,
        )
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    return usable


def _create_session(
    path: Path, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxFileError(f"{path}: onnxruntime cannot load this model: {first_line}") from exc


def _time_runs(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    runs: int,
    duration_s: float | None,
) -> list[float]:
    run, clock = session.run, time.perf_counter  # local names: no attribute lookups in the loop
    samples: list[float] = []
    deadline = None if duration_s is None else clock() + duration_s
    while True:
        start = clock()
        run(None, feeds)
        samples.append((clock() - start) * 1000.0)
        if deadline is None:
            if len(samples) >= runs:
                return samples
        elif len(samples) >= MIN_TIMED_RUNS and clock() >= deadline:
            return samples


def _format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


