"""The ``prune.channels`` method: structured pruning that physically removes channels and
heads (:func:`slimline.compress.prune.structured.prune_channels`) behind one config.

With ``target: latency`` the budget is onnxruntime latency predicted by a per-layer table
(:mod:`slimline.compress.prune.layer_latency`): loaded from ``latency_table`` (e.g. measured on
the target device) or measured now and returned in ``extras["latency_table"]``. The pruned model
is then timed once more, so the metrics show how well the table predicted it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn

from slimline.compress.methods import (
    MethodConfig,
    MethodError,
    MethodInputs,
    PruneResult,
    register_pruner,
)
from slimline.compress.prune.channel_importance import ChannelMagnitudeImportance
from slimline.compress.prune.structured import (
    ChannelPruningResult,
    StructuredPruningError,
    prune_channels,
)
from slimline.params import ParamError, check_range, check_regex, param

__all__ = ["ChannelConfig", "prune_channels_method"]

log = logging.getLogger(__name__)


@dataclass
class ChannelConfig(MethodConfig):
    """Structured pruning: remove whole channels and attention heads (DepGraph-coupled) to a
    channel, FLOPs or measured-latency budget; data-free."""

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
        check_regex("ignore", self.ignore)


@register_pruner(ChannelConfig)
def prune_channels_method(model: nn.Module, config: ChannelConfig,
                          inputs: MethodInputs) -> PruneResult:
    p = config
    example = inputs.require_example("prune.channels")
    extras: dict[str, Any] = {}
    table = _latency_table(model, example, p, extras) if p.target == "latency" else None
    try:
        result = prune_channels(
            model,
            example,
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
            masks=inputs.masks,
            latency_table=table,
            dp_inputs=inputs.synthetic(32, "prune.channels") if p.allocation == "dp" else None,
        )
    except StructuredPruningError as exc:
        raise MethodError(str(exc)) from None
    model.eval()
    metrics = {
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
        metrics |= _latency_check(model, example, result, p)
    odd = sorted(
        n for n, (before, after) in result.layer_channels.items() if after != before and after % 8
    )
    if p.round_to == 1 and odd:
        log.info("%d layers have widths that are not multiples of 8 (e.g. %s); onnxruntime may "
                 "run them slower than expected: consider round_to: 8 or 16", len(odd), odd[0])
    # The masks were sliced with the channels (the surgery keeps them aligned).
    return PruneResult(model, inputs.masks, {"method": "channels", **result.to_dict()}, metrics,
                       extras)


def _latency_table(model: nn.Module, example: Any, p: ChannelConfig,
                   extras: dict[str, Any]) -> Any:
    """The given table, or one measured now (returned in ``extras`` to be kept)."""
    from slimline.compress.prune.layer_latency import build_layer_latency_table
    from slimline.export.layer_lut import LayerLatencyTable, LutError

    if p.latency_table is not None:
        try:
            return LayerLatencyTable.load(p.latency_table)
        except FileNotFoundError:
            raise MethodError(f"latency_table {p.latency_table!r} does not exist") from None
        except LutError as exc:
            raise MethodError(str(exc)) from None
    log.info("measuring a per-layer latency table (onnxruntime, 1 thread, batch 1)")
    try:
        table = build_layer_latency_table(
            model,
            example,
            round_to=p.round_to,
            max_group_ratio=p.max_group_ratio,
            ignore=p.ignore,
            grid_points=p.latency_grid,
            runs=p.latency_runs,
            progress=log.info,
        )
    except StructuredPruningError as exc:
        raise MethodError(str(exc)) from None
    log.info("latency table: %s timings in %s s", table.meta["timings"], table.meta["build_s"])
    extras["latency_table"] = table
    return table


def _latency_check(model: nn.Module, example: Any, result: ChannelPruningResult,
                   p: ChannelConfig) -> dict[str, Any]:
    """Predicted latency before/after, and the pruned model measured against the prediction."""
    from slimline.compress.prune.layer_latency import measure_model_latency

    measured = measure_model_latency(model, example, runs=p.latency_runs)
    predicted = float(result.latency_after_ms or 0.0)
    error = (predicted - measured["median_ms"]) / measured["median_ms"]
    log.info("latency predicted %.3f -> %.3f ms, measured %.3f ms (%+.1f%% prediction error)",
             result.latency_before_ms, predicted, measured["median_ms"], 100 * error)
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
