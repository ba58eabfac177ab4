"""Per-op-type time breakdown from onnxruntime's own profiler (torch-free).

ONNX Runtime writes one Chrome-trace event per executed kernel (``"cat": "Node"``, name
``"<node>_kernel_time"``, ``args.op_name``, duration in microseconds) and one ``"model_run"``
event per ``session.run``. :func:`parse_ort_profile` drops the warm-up runs and sums kernel
time per op type. Profiling adds its own overhead, so it runs in a separate session from the
latency timing (see :func:`slimline.export.latency.profile_onnx`).

Op types are what onnxruntime actually ran after its graph optimizations, e.g. ``FusedConv``
(Conv+Relu), ``QLinearConv`` (a fused int8 QDQ conv) or a ``DequantizeLinear`` left unfused.
"""

from __future__ import annotations

import bisect
import json
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .compare import markdown_table

__all__ = ["OpProfile", "OpStat", "op_table", "parse_ort_profile", "profile_ops"]


@dataclass(frozen=True)
class OpStat:
    """Kernel time of one op type, per ``session.run`` (``nodes``: how many nodes of it ran)."""

    op_type: str
    nodes: int
    ms_per_run: float
    share: float  # of the summed kernel time of all ops; the shares sum to 1


@dataclass(frozen=True)
class OpProfile:
    """Per-op breakdown of one batch size.

    ``run_ms`` is the median ``model_run`` duration onnxruntime measured itself while profiling;
    ``kernel_ms`` is the summed kernel time per run (the sum of the ops' medians). The
    difference is executor overhead (scheduling, allocation, input/output binding), which for
    tiny models is a large part. Profiling itself slows each kernel, so absolute times run
    higher than an unprofiled session's; the shares are the robust part.
    """

    batch_size: int
    runs: int
    kernel_ms: float
    run_ms: float
    ops: tuple[OpStat, ...]  # by time, largest first

    @property
    def overhead_share(self) -> float:
        """Fraction of a run that no kernel accounts for (0 when unknown)."""
        return max(0.0, 1.0 - self.kernel_ms / self.run_ms) if self.run_ms > 0 else 0.0

    def share(self, op_type: str) -> float:
        return next((op.share for op in self.ops if op.op_type == op_type), 0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ops"] = [asdict(op) for op in self.ops]
        data["overhead_share"] = self.overhead_share
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpProfile:
        values = {k: v for k, v in data.items() if k not in ("ops", "overhead_share")}
        return cls(**values, ops=tuple(OpStat(**op) for op in data["ops"]))


def parse_ort_profile(
    events: Iterable[Mapping[str, Any]], *, batch_size: int = 1, skip_runs: int = 0
) -> OpProfile:
    """Aggregate onnxruntime profiling ``events`` (the parsed JSON list) by op type.

    The first ``skip_runs`` ``model_run`` events (warm-up) and every kernel event that started
    before the first kept run are ignored. Each kernel event is assigned to the run it started
    in; an op type's time is the *median over runs* of its summed kernel time in that run, so a
    run slowed by another process does not skew the breakdown. Shares are those medians
    normalised to sum to 1.

    Raises:
        ValueError: no ``model_run`` event is left after skipping (nothing was profiled).
    """
    events = list(events)
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )[skip_runs:]
    if not runs:
        raise ValueError(f"the profile has no model runs after skipping {skip_runs} warm-up runs")
    starts = [float(e["ts"]) for e in runs]
    per_run: dict[str, np.ndarray] = {}
    nodes: dict[str, set[str]] = {}
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        index = bisect.bisect_right(starts, float(event["ts"])) - 1
        if index < 0:  # a warm-up run
            continue
        op_type = str((event.get("args") or {}).get("op_name") or "unknown")
        per_run.setdefault(op_type, np.zeros(len(runs)))[index] += float(event.get("dur", 0))
        nodes.setdefault(op_type, set()).add(name[: -len("_kernel_time")])
    medians_us = {op: float(np.median(times)) for op, times in per_run.items()}
    kernel_us = sum(medians_us.values())
    ops = tuple(
        OpStat(
            op_type=op_type,
            nodes=len(nodes[op_type]),
            ms_per_run=us / 1000.0,
            share=us / kernel_us if kernel_us else 0.0,
        )
        for op_type, us in sorted(medians_us.items(), key=lambda item: (-item[1], item[0]))
    )
    return OpProfile(
        batch_size=batch_size,
        runs=len(runs),
        kernel_ms=kernel_us / 1000.0,
        run_ms=statistics.median(float(e.get("dur", 0)) for e in runs) / 1000.0,
        ops=ops,
    )


def profile_ops(
    path: str | os.PathLike,
    options: ort.SessionOptions,
    providers: list[str],
    feeds: dict[str, np.ndarray],
    *,
    batch_size: int,
    warmup: int = 5,
    runs: int = 50,
) -> OpProfile:
    """Run the model with onnxruntime's profiler on and return its per-op breakdown.

    ``options`` are copied settings-wise (threads, optimization level) into a profiling
    session; the trace file goes to a temporary folder and is deleted after parsing.
    """
    if runs < 1:
        raise ValueError(f"per-op profiling needs at least one run, got {runs}")
    profiled = ort.SessionOptions()
    profiled.intra_op_num_threads = options.intra_op_num_threads
    profiled.inter_op_num_threads = options.inter_op_num_threads
    profiled.graph_optimization_level = options.graph_optimization_level
    profiled.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="slimline-ortprof-") as tmp:
        profiled.enable_profiling = True
        profiled.profile_file_prefix = str(Path(tmp) / "ort_profile")
        session = ort.InferenceSession(str(path), sess_options=profiled, providers=providers)
        for _ in range(warmup + runs):
            session.run(None, feeds)
        trace = Path(session.end_profiling())
        if not trace.is_absolute():  # older onnxruntime versions return a relative name
            trace = Path(tmp) / trace.name
        events = json.loads(trace.read_text(encoding="utf-8"))
    return parse_ort_profile(events, batch_size=batch_size, skip_runs=warmup)


def op_table(profile: OpProfile, *, top: int = 10) -> str:
    """Markdown table of the ``top`` op types by time, then one row for the rest."""
    rows = [("op type", "nodes", "ms/run", "share")]
    shown = profile.ops[:top]
    for op in shown:
        rows.append((op.op_type, str(op.nodes), f"{op.ms_per_run:.4f}", f"{100 * op.share:.1f}%"))
    rest = profile.ops[top:]
    if rest:
        rows.append(
            (
                f"({len(rest)} more)",
                str(sum(op.nodes for op in rest)),
                f"{sum(op.ms_per_run for op in rest):.4f}",
                f"{100 * sum(op.share for op in rest):.1f}%",
            )
        )
    footer = (
        f"median per run: kernels {profile.kernel_ms:.4f} ms of {profile.run_ms:.4f} ms "
        f"(executor overhead {100 * profile.overhead_share:.0f}%); batch {profile.batch_size}, "
        f"{profile.runs} profiled runs. Profiling adds a fixed cost to every kernel (large for "
        "microsecond kernels): trust the shares more than the absolute times."
    )
    return f"{markdown_table(rows)}\n\n{footer}"
