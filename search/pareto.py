"""Pareto fronts of a multi-objective search: the set, a markdown table and a plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["pareto_front", "plot_front"]


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Point ``a`` dominates ``b`` when it is at least as good in every objective and strictly
    better in one ("maximize"/"minimize" per objective). Duplicates of a front point are all
    kept (neither dominates the other). O(n²), fine for the few hundred trials of a search.
    """
    signs = []
    for direction in directions:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
        signs.append(1.0 if direction == "maximize" else -1.0)
    oriented = [[s * float(v) for s, v in zip(signs, p)] for p in points]
    front = []
    for i, a in enumerate(oriented):
        dominated = any(
            all(bj >= aj for aj, bj in zip(a, b)) and any(bj > aj for aj, bj in zip(a, b))
            for j, b in enumerate(oriented) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plot_front(rows: Sequence[dict[str, Any]], front: Sequence[int], chosen: int | None,
               path: Path, *, x: str, y: str, title: str) -> Path:
    """All trials as grey dots, the front as a line, the chosen architecture as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimline.io import atomic_path

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    axes.scatter([r[x] for r in rows], [r[y] for r in rows], s=12, c="0.6", label="trials")
    ordered = sorted(front, key=lambda i: rows[i][x])
    axes.plot([rows[i][x] for i in ordered], [rows[i][y] for i in ordered], "o-", c="C0",
              label="Pareto front")
    if chosen is not None:
        axes.scatter([rows[chosen][x]], [rows[chosen][y]], marker="*", s=200, c="C3",
                     label="chosen", zorder=3)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
