"""Comparing latency reports: markdown tables, CSV rows, and never mixing machines silently.

A report carries where it was measured (``report.machine``, see :func:`export.machine_info`).
Reports measured on different machines (another CPU model, ISA flags, core count or
onnxruntime version) are not comparable: :func:`compare_table` warns and prints one table per
machine, with ratios computed only within a table.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .latency import LatencyReport

__all__ = [
    "MixedMachinesWarning",
    "compare_table",
    "csv_text",
    "group_by_machine",
    "machine_label",
]

# What makes two measurements comparable; "os" and "python" rarely change timings.
_MACHINE_KEYS = ("cpu", "arch", "logical_cores", "available_cores", "isa_flags", "onnxruntime")
CSV_COLUMNS = (
    "model",
    "path",
    "batch_size",
    "runs",
    "median_ms",
    "p90_ms",
    "p99_ms",
    "min_ms",
    "mean_ms",
    "std_ms",
    "throughput",
    "vs_first",
    "file_bytes",
    "quant_format",
    "providers",
    "intra_op_threads",
    "graph_optimization",
    "machine",
    "onnxruntime",
)


class MixedMachinesWarning(UserWarning):
    """Reports from different machines were compared; they are shown separately."""


def machine_key(machine: Mapping[str, Any]) -> tuple:
    return tuple(tuple(v) if isinstance(v := machine.get(k), list) else v for k in _MACHINE_KEYS)


def machine_label(machine: Mapping[str, Any]) -> str:
    """One line naming a machine, e.g. ``Intel Xeon, 2/2 cores, avx512_vnni+amx_int8, ort 1.31``."""
    if not machine:
        return "unknown machine"
    flags = "+".join(machine.get("isa_flags") or ()) or "no int8 ISA flags"
    return (
        f"{machine.get('cpu', '?')}, {machine.get('available_cores', '?')}/"
        f"{machine.get('logical_cores', '?')} cores, {flags}, "
        f"onnxruntime {machine.get('onnxruntime', '?')}"
    )


def group_by_machine(reports: Sequence[LatencyReport]) -> list[list[LatencyReport]]:
    """Reports grouped by the machine they were measured on, groups in first-seen order."""
    groups: dict[tuple, list[LatencyReport]] = {}
    for report in reports:
        groups.setdefault(machine_key(report.machine), []).append(report)
    return list(groups.values())


def compare_table(reports: Sequence[LatencyReport]) -> str:
    """Markdown table, one row per (model, batch size).

    ``vs first`` is this model's median divided by the first report's median at the same
    batch size: 0.50x means twice as fast as the first model, "-" means the first model was
    not measured at that batch size. Reports from different machines get a
    :class:`MixedMachinesWarning` and one table each, headed by the machine.
    """
    if not reports:
        return ""
    groups = group_by_machine(reports)
    if len(groups) == 1:
        return _table(groups[0])
    labels = [machine_label(group[0].machine) for group in groups]
    warnings.warn(
        f"the reports come from {len(groups)} different machines ({'; '.join(labels)}); "
        "showing one table per machine: latencies across machines are not comparable",
        MixedMachinesWarning,
        stacklevel=2,
    )
    parts = [
        f"machine {i}: {label}\n\n{_table(group)}"
        for i, (label, group) in enumerate(zip(labels, groups), start=1)
    ]
    return "\n\n".join(parts)


def csv_text(reports: Sequence[LatencyReport]) -> str:
    """CSV with one row per (model, batch size) and :data:`CSV_COLUMNS` columns.

    ``vs_first`` is relative to the first report measured on the same machine (empty when that
    report lacks the batch size).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for group in group_by_machine(reports):
        baseline = {b.batch_size: b.median_ms for b in group[0].batches}
        for report in group:
            for b in report.batches:
                base = baseline.get(b.batch_size)
                writer.writerow(
                    [
                        report.name,
                        report.model,
                        b.batch_size,
                        b.runs,
                        *(f"{v:.6g}" for v in (b.median_ms, b.p90_ms, b.p99_ms, b.min_ms)),
                        *(f"{v:.6g}" for v in (b.mean_ms, b.std_ms, b.throughput)),
                        f"{b.median_ms / base:.4f}" if base else "",
                        report.file_bytes,
                        report.quant_format,
                        "+".join(report.providers),
                        report.intra_op_threads,
                        report.graph_optimization,
                        machine_label(report.machine),
                        report.machine.get("onnxruntime", ""),
                    ]
                )
    return buffer.getvalue()


def _table(reports: Sequence[LatencyReport]) -> str:
    names = [r.name for r in reports]
    if len(set(names)) < len(names):  # same file name in different folders
        names = [r.model for r in reports]
    baseline = {b.batch_size: b.median_ms for b in reports[0].batches}
    header = ("model", "size", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "vs first")
    rows = [header]
    for name, report in zip(names, reports, strict=True):
        size = format_bytes(report.file_bytes)
        for b in report.batches:
            base = baseline.get(b.batch_size)
            ratio = f"{b.median_ms / base:.2f}x" if base else "-"
            times = (f"{t:.3f}" for t in (b.median_ms, b.p90_ms, b.p99_ms))
            rows.append((name, size, str(b.batch_size), *times, f"{b.throughput:.1f}", ratio))
    return markdown_table(rows)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) as a markdown table: column 0 left-aligned, the rest
    right-aligned (markdown's ":" on the right)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
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


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"
