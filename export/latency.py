"""Latency profiling of ONNX models with ONNX Runtime, and the ``slimline profile`` command.

Importable without torch (numpy + onnxruntime + stdlib only) so it runs on deployment hosts.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .compare import compare_table
from .feeds import random_inputs
from .graph import OnnxFileError, TensorInfo, graph_summary
from .int8check import Int8Warning, int8_warnings
from .machine import machine_info
from .opprofile import OpProfile, profile_ops

__all__ = [
    "BatchLatency",
    "LatencyReport",
    "compare_table",
    "load_error",
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
    op_profiles: tuple[OpProfile, ...] = ()  # per batch size, with ``per_op=True``
    quant_format: str = "float"  # see slimline.export.graph.quant_format
    # Why an int8 model may not beat fp32 here (see slimline.export.int8check); also raised as warnings.
    diagnostics: tuple[str, ...] = ()
    seq_len: int | None = None  # token models: the sequence length timed

    @property
    def name(self) -> str:
        return Path(self.model).name

    def op_profile(self, batch_size: int) -> OpProfile | None:
        return next((p for p in self.op_profiles if p.batch_size == batch_size), None)

    def batch(self, batch_size: int) -> BatchLatency | None:
        return next((b for b in self.batches if b.batch_size == batch_size), None)

    def to_dict(self, *, include_samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict; ``include_samples`` adds every raw timing."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data |= {k: list(data[k]) for k in ("providers", "requested_providers")}
        data["batches"] = [b.to_dict(include_samples=include_samples) for b in self.batches]
        data["machine"] = dict(self.machine)
        data["op_profiles"] = [p.to_dict() for p in self.op_profiles]
        data["diagnostics"] = list(self.diagnostics)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyReport:
        """Inverse of :meth:`to_dict`, e.g. to compare against a saved report."""
        batches = tuple(
            BatchLatency(**(b | {"samples_ms": tuple(b.get("samples_ms", ()))}))
            for b in data["batches"]
        )
        tuples = {"providers", "requested_providers", "diagnostics"}
        skip = {"batches", "op_profiles"}
        values = {k: tuple(v) if k in tuples else v for k, v in data.items() if k not in skip}
        op_profiles = tuple(OpProfile.from_dict(p) for p in data.get("op_profiles", ()))
        return cls(**values, batches=batches, op_profiles=op_profiles)


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
    seq_len: int | None = None,
    seed: int = 0,
    per_op: bool = False,
    per_op_runs: int = 50,
    check_int8: bool = True,
) -> LatencyReport:
    """Measure ONNX Runtime latency of the model at ``path`` for each batch size.

    Inputs are random tensors from the model's input metadata (see
    :func:`slimline.export.feeds.random_inputs`): a dynamic dimension 0 is the batch size; other dynamic
    dimensions must be given by ``input_shapes``, or for token models by ``seq_len`` (every
    dimension named ``seq``: input ids and attention masks, all ones).

    Each batch size gets ``warmup`` untimed runs, then ``runs`` timed runs, or, with
    ``duration_s``, as many as fit in that time (``runs`` is then ignored, minimum
    :data:`MIN_TIMED_RUNS`). ``intra_op_threads``/``inter_op_threads`` of 0 let ONNX Runtime
    choose. Unavailable providers are dropped with a warning; CPU is always the last fallback.

    ``per_op`` adds a per-op-type breakdown for each batch size from onnxruntime's profiler
    (``per_op_runs`` profiled runs in a separate session, so profiling overhead never touches
    the latency numbers); see :mod:`slimline.export.opprofile`. For a quantized model ``check_int8``
    looks for reasons int8 will not help (see :mod:`slimline.export.int8check`): each is raised as an
    :class:`~slimline.export.int8check.Int8Warning` and kept in ``report.diagnostics``.

    Raises:
        FileNotFoundError: no file at ``path``.
        OnnxFileError: ONNX Runtime cannot load the file (the message names an unsupported op).
        ValueError: bad arguments, an input shape that cannot be determined, or inputs that
            ONNX Runtime rejects when running (the message names the shapes fed).
    """
    path = Path(path)
    _validate(batch_sizes, warmup, runs, duration_s, intra_op_threads, inter_op_threads)
    if graph_optimization not in _OPT_LEVELS:
        raise ValueError(
            f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, got {graph_optimization!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    if per_op and per_op_runs < 1:
        raise ValueError(f"per_op_runs must be >= 1, got {per_op_runs}")
    summary = graph_summary(path)  # OnnxFileError for a non-ONNX file, before ORT's own message

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = _OPT_LEVELS[graph_optimization]
    options.log_severity_level = 3  # errors only: node-placement warnings would spam the CLI
    usable = _usable_providers(providers)
    session = _create_session(path, options, usable)
    machine = machine_info()
    diagnostics: list[str] = []
    if check_int8 and summary.is_quantized:
        diagnostics = int8_warnings(
            path,
            machine=machine,
            providers=usable,
            graph_optimization_level=options.graph_optimization_level,
            summary=summary,
        )
        for message in diagnostics:
            warnings.warn(message, Int8Warning, stacklevel=2)

    rng = np.random.default_rng(seed)
    signature = [
        TensorInfo(arg.name, tuple(arg.shape), _ORT_DTYPES.get(arg.type, arg.type))
        for arg in session.get_inputs()
    ]
    results, op_profiles = [], []
    for batch_size in batch_sizes:
        try:
            feeds = random_inputs(signature, batch_size, input_shapes=input_shapes,
                                  dims={"seq": seq_len} if seq_len else None, rng=rng)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        _first_run(session, feeds, path)
        for _ in range(warmup):
            session.run(None, feeds)
        results.append(
            BatchLatency.from_samples(batch_size, _time_runs(session, feeds, runs, duration_s))
        )
        if per_op:
            op_profiles.append(
                profile_ops(
                    path,
                    options,
                    usable,
                    feeds,
                    batch_size=batch_size,
                    warmup=min(warmup, 10),
                    runs=per_op_runs,
                )
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
        machine=machine,
        op_profiles=tuple(op_profiles),
        quant_format=summary.quant_format,
        diagnostics=tuple(diagnostics),
        seq_len=seq_len if any(i.dtype.startswith("int") for i in summary.inputs) else None,
    )


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
        raise load_error(path, exc, providers) from exc


# onnxruntime's wording for "no kernel for this op" (checked against onnxruntime 1.31)
_UNREGISTERED_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")
_NO_KERNEL = re.compile(
    r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"
)


def load_error(path: Path, exc: BaseException, providers: Sequence[str]) -> OnnxFileError:
    """An :class:`OnnxFileError` for a session that would not start, naming the op when the
    cause is an op the execution provider(s) do not implement."""
    text = str(exc).strip()
    first_line = (text.splitlines() or [type(exc).__name__])[0]
    where = ", ".join(providers)
    if match := _UNREGISTERED_OP.search(text):
        domain, op = match.groups()
        return OnnxFileError(
            f"{path}: op {f'{domain}.' if domain else ''}{op} is not implemented by "
            f"onnxruntime {ort.__version__} ({where}); it is a custom op: register its "
            "library (SessionOptions.register_custom_ops_library) or export without it"
        )
    if match := _NO_KERNEL.search(text):
        op, version, node = match.groups()
        return OnnxFileError(
            f"{path}: node {node!r} uses op {op} (opset {version}), which {where} does not "
            "implement for these input types; try another opset or execution provider"
        )
    return OnnxFileError(f"{path}: onnxruntime cannot load this model: {first_line}")


def _first_run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], path: Path) -> None:
    """One untimed run that turns onnxruntime's run-time errors (shapes the graph rejects)
    into a ValueError naming the shapes that were fed."""
    try:
        session.run(None, feeds)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shapes = ", ".join(f"{name}={list(array.shape)}" for name, array in feeds.items())
        raise ValueError(
            f"{path}: onnxruntime cannot run the model on inputs {shapes}: {first_line} "
            "(check --input-shape / input_shapes)"
        ) from exc


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
