"""Bar chart of latency reports (``slimline profile --plot FILE.png``).

matplotlib is imported only when a plot is drawn, and through its object API (``Figure`` +
the Agg canvas) rather than pyplot, so drawing never touches a global backend or opens a window.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .compare import group_by_machine
from .graph import atomic_write_bytes

if TYPE_CHECKING:
    from .latency import LatencyReport

__all__ = ["latency_png", "matplotlib_available", "plot_latency"]


def matplotlib_available() -> bool:
    """Whether :func:`plot_latency` can draw (checked before minutes of measuring)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_latency(reports: Sequence[LatencyReport], path: str | os.PathLike) -> Path:
    """:func:`latency_png` written atomically to ``path``."""
    return atomic_write_bytes(path, latency_png(reports))


def latency_png(reports: Sequence[LatencyReport]) -> bytes:
    """PNG bytes: median latency per model, grouped by batch size, with whiskers up to p90.
    Reports from different machines get the machine number in their label, since their bars
    are not comparable."""
    if not reports:
        raise ValueError("no reports to plot")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc

    groups = group_by_machine(reports)
    labels = []
    ordered: list[LatencyReport] = []
    for index, group in enumerate(groups, start=1):
        for report in group:
            ordered.append(report)
            labels.append(report.name + (f" (machine {index})" if len(groups) > 1 else ""))
    batch_sizes = sorted({b.batch_size for r in ordered for b in r.batches})
    width = 0.8 / len(ordered)

    figure = Figure(
        figsize=(max(6.0, 1.2 * len(batch_sizes) * len(ordered) ** 0.5 + 3), 4), dpi=120
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (label, report) in enumerate(zip(labels, ordered, strict=True)):
        xs, medians, spreads = [], [], []
        for j, batch_size in enumerate(batch_sizes):
            stats = report.batch(batch_size)
            if stats is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            medians.append(stats.median_ms)
            spreads.append(max(stats.p90_ms - stats.median_ms, 0.0))
        # Whiskers only upwards, to p90: the tail is what a deployment notices.
        axes.bar(xs, medians, width, label=label, yerr=[[0.0] * len(xs), spreads], capsize=3)
    axes.set_xticks(range(len(batch_sizes)), [f"batch {b}" for b in batch_sizes])
    axes.set_ylabel("latency per run, median (ms); whisker: p90")
    axes.set_ylim(bottom=0)  # ratios read honestly only from zero
    axes.set_title("onnxruntime latency")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
