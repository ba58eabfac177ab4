"""``prune.channels``: structured pruning that physically removes channels and attention heads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from compress.prune.channel_importance import ChannelMagnitudeImportance
from compress.prune.structured import ChannelPruningResult, StructuredPruningError, prune_channels
from slimline.artifact import Artifact
from slimline.io import atomic_path
from slimline.params import ParamError, check_range, param
from slimline.stage import StageContext, register_stage


@dataclass
class ChannelPruneParams:
    ratio: float = param(0.3, help="fraction of `target` to remove, in [0, 1)")
    target: Literal["channels", "flops"] = param(
        "channels", help="what `ratio` measures: channels of the prunable groups, or model FLOPs"
    )
    importance: Literal["l1", "l2"] = param(
        "l1",
        help="channel score: L1 or L2 norm of the weights producing it times that of the "
        "weights reading it (each layer mean-normalised)",
    )
    allocation: Literal["uniform", "global", "dp"] = param(
        "uniform",
        help="uniform: same fraction per group; global: rank all channels together; "
        "dp: least output distortion under the budget (dynamic programme)",
    )
    dp_distortion: Literal["output", "magnitude"] = param(
        "output", help="dp only: output change on N(0,1) inputs (data-free) or summed scores"
    )
    round_to: int = param(
        1,
        help="kept channels per group are a multiple of this: 8 (AVX2/NEON) or 16 "
        "(AVX-512); onnxruntime can run odd widths slower than the unpruned model",
    )
    ignore: str | None = param(
        None, help="regex on layer names whose output channels stay (the classifier always does)"
    )
    max_group_ratio: float = param(0.9, help="no group loses more than this fraction")
    prune_heads: bool = param(True, help="prune attention in whole heads (q/k/v rows + proj cols)")
    prune_embedding: bool = param(
        False, help="also prune LayerNorm-normalised widths (a transformer's residual stream)"
    )

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        if self.round_to < 1:
            raise ParamError("round_to", f"must be at least 1, got {self.round_to}")
        if not 0.0 < self.max_group_ratio < 1.0:
            raise ParamError("max_group_ratio", f"must be in (0, 1), got {self.max_group_ratio}")
        if self.ignore is not None:
            try:
                re.compile(self.ignore)
            except re.error as exc:
                raise ParamError("ignore", f"invalid regular expression: {exc}") from None


@register_stage("prune.channels", ChannelPruneParams)
def prune_channels_stage(
    ctx: StageContext, inputs: list[Artifact], p: ChannelPruneParams
) -> Artifact:
    """Structured pruning: remove channels/heads (DepGraph-coupled) to a channel or FLOPs target."""
    out = inputs[0].derive(copy_model=True)
    try:
        result = prune_channels(
            out.model,
            out.example_input(1),
            p.ratio,
            target=p.target,
            importance=ChannelMagnitudeImportance(p=1 if p.importance == "l1" else 2),
            allocation=p.allocation,
            round_to=p.round_to,
            ignore=p.ignore,
            max_group_ratio=p.max_group_ratio,
            prune_heads=p.prune_heads,
            prune_embedding=p.prune_embedding,
            dp_distortion=p.dp_distortion,
            masks=out.masks,
        )
    except StructuredPruningError as exc:
        raise ctx.fail(str(exc)) from None
    out.model.eval()
    record = result.to_dict()
    previous = out.state.get("pruning")
    out.state["pruning"] = {
        "method": "channels",
        **record,
        **({"previous": previous} if previous else {}),
    }
    out.metrics = {
        "flops_before": result.flops_before,
        "flops_after": result.flops_after,
        "flops_ratio": result.flops_ratio,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "params_ratio": result.params_ratio,
        "channels_removed": result.channels_removed,
        "target": p.target,
        "ratio": p.ratio,
        "layer_channels": result.layer_channels,
        "heads": result.heads,
        "skipped": result.skipped,
    }
    out.files["channels_png"] = plot_layer_channels(
        result,
        ctx.work_dir / "channels.png",
        title=f"{ctx.stage_id}: {p.allocation}, {p.ratio:.0%} of {p.target}, FLOPs x"
        f"{result.flops_ratio:.2f}",
    )
    ctx.log(
        f"kept {1 - result.channels_removed:.1%} of prunable channels, FLOPs "
        f"{result.flops_ratio:.1%}, params {result.params_ratio:.1%}"
    )
    odd = sorted(
        n for n, (before, after) in result.layer_channels.items() if after != before and after % 8
    )
    if p.round_to == 1 and odd:
        ctx.log(
            f"{len(odd)} layers have widths that are not multiples of 8 (e.g. {odd[0]}); "
            "onnxruntime may run them slower than expected: consider round_to: 8 or 16"
        )
    return out


def plot_layer_channels(result: ChannelPruningResult, path: Path, *, title: str = "") -> Path:
    """Bar chart of every Conv/Linear layer's output channels before and after (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = list(result.layer_channels)
    before = [result.layer_channels[n][0] for n in names]
    after = [result.layer_channels[n][1] for n in names]
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
