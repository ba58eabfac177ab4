"""``prune.channels``: structured pruning that physically removes channels and attention heads.

With ``target: latency`` the budget is onnxruntime latency predicted by a per-layer table
(:mod:`slimline.compress.prune.layer_latency`): loaded from ``latency_table`` (e.g. measured on the target
device) or measured here and saved as ``layer_latency.json`` in the stage's folder. After pruning
the whole pruned model is timed once more so the metrics show how well the table predicted it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slimline.artifact import Artifact
from slimline.compress.prune.channel_importance import ChannelMagnitudeImportance
from slimline.compress.prune.structured import (
    ChannelPruningResult,
    StructuredPruningError,
    prune_channels,
)
from slimline.io import atomic_path
from slimline.params import ParamError, check_range, param
from slimline.stage import StageContext, register_stage


@dataclass
class ChannelPruneParams:
    ratio: float = param(0.3, help="fraction of `target` to remove, in [0, 1)")
    target: Literal["channels", "flops", "latency"] = param(
        "channels",
        help="what `ratio` measures: channels of the prunable groups, model FLOPs, or "
        "onnxruntime latency predicted by a per-layer table (see latency_table)",
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
    latency_table: str | None = param(
        None,
        help="target latency: per-layer table JSON (e.g. measured on the target device); by "
        "default one is measured here (1 thread, batch 1) and saved in the stage folder",
    )
    latency_grid: int = param(4, help="target latency: widths per side of each layer's grid")
    latency_runs: int = param(
        60, help="target latency: timed runs per grid point and for the final whole-model check"
    )

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        if self.round_to < 1:
            raise ParamError("round_to", f"must be at least 1, got {self.round_to}")
        if not 0.0 < self.max_group_ratio < 1.0:
            raise ParamError("max_group_ratio", f"must be in (0, 1), got {self.max_group_ratio}")
        if self.latency_grid < 2:
            raise ParamError("latency_grid", f"must be at least 2, got {self.latency_grid}")
        if self.latency_runs < 1:
            raise ParamError("latency_runs", f"must be at least 1, got {self.latency_runs}")
        if self.latency_table is not None and self.target != "latency":
            raise ParamError("latency_table", "is only used with target: latency")
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
    table = _latency_table(ctx, out, p) if p.target == "latency" else None
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
            latency_table=table,
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
    if table is not None:
        out.metrics |= _latency_check(ctx, out, result, p)
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


def _latency_table(ctx: StageContext, out: Artifact, p: ChannelPruneParams) -> Any:
    """The given table, or one measured now and cached as ``layer_latency.json`` (reused if the
    stage folder already has one for this model)."""
    from slimline.export.layer_lut import LayerLatencyTable, LutError

    if p.latency_table is not None:
        try:
            return LayerLatencyTable.load(p.latency_table)
        except FileNotFoundError:
            raise ctx.fail(f"latency_table {p.latency_table!r} does not exist") from None
        except LutError as exc:
            raise ctx.fail(str(exc)) from None
    from slimline.compress.prune.layer_latency import build_layer_latency_table, model_layer_widths

    path = ctx.work_dir / "layer_latency.json"
    if path.is_file():
        try:
            cached = LayerLatencyTable.load(path)
            cached.check_layers(model_layer_widths(out.model))
            out.files["latency_table"] = path
            return cached
        except LutError:
            pass  # a stale table for another model: measure again
    ctx.log("measuring a per-layer latency table (onnxruntime, 1 thread, batch 1)")
    try:
        table = build_layer_latency_table(
            out.model,
            out.example_input(1),
            round_to=p.round_to,
            max_group_ratio=p.max_group_ratio,
            ignore=p.ignore,
            grid_points=p.latency_grid,
            runs=p.latency_runs,
            progress=ctx.log,
        )
    except StructuredPruningError as exc:
        raise ctx.fail(str(exc)) from None
    out.files["latency_table"] = table.save(path)
    ctx.log(f"latency table: {table.meta['timings']} timings in {table.meta['build_s']} s")
    return table


def _latency_check(
    ctx: StageContext, out: Artifact, result: ChannelPruningResult, p: ChannelPruneParams
) -> dict[str, Any]:
    """Predicted latency before/after, and the pruned model measured against the prediction."""
    from slimline.compress.prune.layer_latency import measure_model_latency

    measured = measure_model_latency(out.model, out.example_input(1), runs=p.latency_runs)
    predicted = float(result.latency_after_ms or 0.0)
    error = (predicted - measured["median_ms"]) / measured["median_ms"]
    ctx.log(
        f"latency predicted {result.latency_before_ms:.3f} -> {predicted:.3f} ms, measured "
        f"{measured['median_ms']:.3f} ms ({error:+.1%} prediction error)"
    )
    return {
        "latency_predicted_before_ms": result.latency_before_ms,
        "latency_predicted_after_ms": predicted,
        "latency_predicted_ratio": predicted / result.latency_before_ms
        if result.latency_before_ms
        else 1.0,
        "latency_measured_after_ms": measured["median_ms"],
        "latency_measured_p90_ms": measured["p90_ms"],
        "latency_prediction_error": error,
    }


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
