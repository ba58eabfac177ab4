"""Charts the stages put beside their outputs (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

from slimline.io import atomic_path

__all__ = ["plot_layer_channels", "plot_layer_sparsity", "plot_oscillation"]


def plot_layer_sparsity(per_layer: dict[str, float], path: Path, *, title: str = "") -> Path:
    """Bar chart of per-layer sparsity (PNG), written atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = list(per_layer)
    figure, axes = plt.subplots(figsize=(max(5.0, 0.3 * len(names) + 2), 4), dpi=110)
    axes.bar(range(len(names)), [100 * per_layer[n] for n in names], color="tab:blue")
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=75, fontsize=7)
    axes.set_ylabel("sparsity (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title, fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def plot_layer_channels(layer_channels: dict[str, tuple[int, int]] | dict[str, list[int]],
                        path: Path, *, title: str = "") -> Path:
    """Bar chart of every Conv/Linear layer's output channels before and after (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = list(layer_channels)
    before = [layer_channels[n][0] for n in names]
    after = [layer_channels[n][1] for n in names]
    figure, axes = plt.subplots(figsize=(max(5.0, 0.3 * len(names) + 2), 4), dpi=110)
    positions = range(len(names))
    axes.bar(positions, before, color="tab:gray", alpha=0.35, label="before")
    axes.bar(positions, after, color="tab:blue", label="after")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=75, fontsize=7)
    axes.set_ylabel("output channels")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def plot_oscillation(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """PNG of the oscillating share per epoch (the report links PNGs in the stage dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["epoch"] for r in history], [100 * r["oscillation_share"] for r in history], "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("oscillating weights (%)")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
