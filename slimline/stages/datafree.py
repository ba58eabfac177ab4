"""Data-free compression stages: ``quant.datafree``, ``quant.dfq``, ``compress.udfc``,
``prune.neuron_merging`` and ``prune.plain_channels``.

Data-free is enforced, not just claimed: every stage here runs inside :func:`no_data`, which
makes ``ctx.data`` raise :class:`DataAccessError` for the duration of the stage, so no code path
of theirs can read the dataset (the model's example input is random, activation ranges come from
BatchNorm statistics). The ``eval`` stages that score them afterwards do use data, of course.

``prune.plain_channels`` is the no-repair baseline of ``prune.neuron_merging`` and
``compress.udfc``: the same prune sites and the same channels by filter norm, nothing
compensated. ``prune.channels`` is the general structured pruner (residual-coupled groups,
FLOPs targets, BN-aware scores); it does not restrict itself to the sites a next layer can
repair, so it is not the baseline for these methods.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from slimline.artifact import Artifact
from slimline.params import ParamError, check_range, param
from slimline.stage import StageContext, StageFailed, register_stage
from slimline.stages.quant import target_metrics


class DataAccessError(StageFailed):
    """A data-free stage tried to read the dataset."""


@contextlib.contextmanager
def no_data(ctx: StageContext) -> Iterator[None]:
    """Within this block ``ctx.data`` raises :class:`DataAccessError` (also when the dataset
    was loaded before: the cached value is hidden and restored afterwards)."""
    loader, cached = ctx.data_loader, ctx.__dict__.pop("data", None)

    def refuse() -> Any:
        raise DataAccessError(
            f"stage {ctx.stage_id!r} ({ctx.uses}) is data-free and may not read the dataset"
        )

    ctx.data_loader = refuse
    try:
        yield
    finally:
        ctx.data_loader = loader
        ctx.__dict__.pop("data", None)
        if cached is not None:
            ctx.__dict__["data"] = cached


def data_free(
    function: Callable[[StageContext, list[Artifact], Any], Artifact],
) -> Callable[[StageContext, list[Artifact], Any], Artifact]:
    """Run a stage function under :func:`no_data` (decorator)."""

    @functools.wraps(function)
    def wrapper(ctx: StageContext, inputs: list[Artifact], p: Any) -> Artifact:
        with no_data(ctx):
            return function(ctx, inputs, p)

    return wrapper


def _check_regex(key: str, pattern: str | None) -> None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ParamError(key, f"invalid regular expression: {exc}") from None


@dataclass
class DataFreeQuantParams:
    weight_bits: int = param(8, help="weight bits, 2-8 (below 8: low-bit levels on the int8 grid)")
    per_channel: bool = param(True, help="one weight scale per output channel (else per tensor)")
    symmetric_weights: bool = param(
        True, help="symmetric weight grid (zero point 0; what int8 kernels want)"
    )
    activation_dtype: Literal["uint8", "int8"] = param(
        "uint8", help="activation grid; uint8 is what x86 onnxruntime fuses best (U8S8)"
    )
    symmetric_activations: bool = param(False, help="symmetric activation grid")
    range_sigmas: float = param(
        6.0, help="activation grids cover BN mean +- this many BN standard deviations"
    )
    input_std: float = param(1.0, help="model input taken as N(0, input_std^2) (standardised)")
    skip: str | None = param(None, help="regex of Conv/Linear names kept in float")

    def __post_init__(self) -> None:
        if not 2 <= self.weight_bits <= 8:
            raise ParamError("weight_bits", f"must be in [2, 8], got {self.weight_bits}")
        if self.range_sigmas <= 0:
            raise ParamError("range_sigmas", f"must be positive, got {self.range_sigmas}")
        if self.input_std <= 0:
            raise ParamError("input_std", f"must be positive, got {self.input_std}")
        _check_regex("skip", self.skip)


@dataclass
class DFQParams(DataFreeQuantParams):
    equalize: bool = param(True, help="cross-layer equalization of conv -> ReLU -> conv pairs")
    absorb_high_bias: bool = param(True, help="move BN mean - 3 std into the next layer's bias")
    correct_bias: bool = param(True, help="analytic bias correction from BN statistics")


@dataclass
class UDFCParams(DataFreeQuantParams):
    prune_ratio: float = param(0.3, help="fraction of each prune site's channels removed, [0, 1)")
    weight_bits: int = param(6, help="weight bits, 2-8 (below 8: low-bit levels on the int8 grid)")
    criterion: Literal["l1", "l2"] = param("l1", help="which channels: smallest filter L1/L2 norm")
    alpha1: float = param(0.01, help="weight of the BN-bias term in the pruning reconstruction")
    alpha2: float = param(0.008, help="weight of the BN-bias term in the quantization scale")
    activation_bits: int = param(8, help="activation bits (8: what int8 kernels run)")
    compensate_quantization: bool = param(
        True, help="scale the next layer by s~ for each quantized channel (UDFC's second half)"
    )
    mean_correction: bool = param(
        False, help="also restore the next layer's mean input from BN statistics (not in the paper)"
    )
    mean_preserving: bool = param(
        False,
        help="constrain the pruning scales to keep each pruned channel's BN-predicted mean output "
        "(not in the paper)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, high_open=True)
        if self.alpha1 < 0 or self.alpha2 < 0:
            raise ParamError("alpha1" if self.alpha1 < 0 else "alpha2", "must be >= 0")
        if self.activation_bits != 8:
            raise ParamError(
                "activation_bits",
                f"only 8-bit activations are supported (int8 kernels), got {self.activation_bits}",
            )


@dataclass
class PlainChannelsParams:
    prune_ratio: float = param(0.3, help="fraction of each prune site's channels removed, [0, 1)")
    criterion: Literal["l1", "l2"] = param("l1", help="which channels: smallest filter L1/L2 norm")
    mean_correction: bool = param(
        False, help="restore the next layer's mean input from BN statistics (not in NM)"
    )

    def __post_init__(self) -> None:
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, high_open=True)


@dataclass
class NeuronMergingParams(PlainChannelsParams):
    threshold: float = param(0.1, help="merge only into a kept filter at least this similar (cos)")
    lam: float = param(0.85, help="weight of cosine distance vs BN-bias distance when choosing")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("threshold", self.threshold, -1.0, 1.0)
        check_range("lam", self.lam, 0.0, 1.0)


def _float_input(ctx: StageContext, source: Artifact) -> None:
    if "quantization" in source.state:
        method = source.state["quantization"].get("method", "?")
        raise ctx.fail(
            f"the input model is already quantized (method {method!r}); give this "
            "stage the float model"
        )


def _quant_kwargs(ctx: StageContext, p: DataFreeQuantParams) -> dict[str, Any]:
    return {
        "target": ctx.target,
        "weight_bits": p.weight_bits,
        "per_channel": p.per_channel,
        "symmetric_weights": p.symmetric_weights,
        "range_sigmas": p.range_sigmas,
        "activation_signed": p.activation_dtype == "int8",
        "symmetric_activations": p.symmetric_activations,
        "input_std": p.input_std,
        "skip": p.skip,
    }


def _quant_metrics(result: Any, p: DataFreeQuantParams, method: str) -> dict[str, Any]:
    metrics = {
        "method": method,
        "weight_bits": p.weight_bits,
        "weight_levels": 2**p.weight_bits - 1,
        "weight_storage": "int8",
        "activation_bits": 8,
        "activation_dtype": p.activation_dtype,
        "per_channel": p.per_channel,
        "activation_ranges": result.ranges,
        "range_sigmas": p.range_sigmas,
        "data_used": False,
        "quantized_layers": len(result.quantized),
        "float_layers": result.skipped,
        "activation_points": len(result.state.activations),
        "folded_batchnorm": len(result.folded),
        **result.dfq,
        **target_metrics(result.state.info),
    }
    for key in ("bias_corrected",):
        if key in metrics:
            metrics[key] = len(metrics[key])
    return metrics


def _quantize(
    ctx: StageContext, inputs: list[Artifact], p: DataFreeQuantParams, *, method: str, **dfq: bool
) -> Artifact:
    from slimline.compress.quant.bn_statistics import DataFreeRangeError
    from slimline.compress.quant.datafree import quantize_datafree

    _float_input(ctx, inputs[0])
    out = inputs[0].derive(copy_model=True)
    try:
        result = quantize_datafree(out.model, **_quant_kwargs(ctx, p), method=method, **dfq)
    except (ValueError, DataFreeRangeError) as exc:
        raise ctx.fail(str(exc)) from None
    out.state["quantization"] = result.state.to_dict()
    out.metrics = _quant_metrics(result, p, method)
    return out


@register_stage("quant.datafree", DataFreeQuantParams, target_aware=True)
@data_free
def quant_datafree(ctx: StageContext, inputs: list[Artifact], p: DataFreeQuantParams) -> Artifact:
    """Round-to-nearest weights, activation ranges from BN statistics; never reads data."""
    return _quantize(ctx, inputs, p, method="datafree")


@register_stage("quant.dfq", DFQParams, target_aware=True)
@data_free
def quant_dfq(ctx: StageContext, inputs: list[Artifact], p: DFQParams) -> Artifact:
    """DFQ (Nagel 2019): equalization, high-bias absorption, bias correction; no data."""
    return _quantize(
        ctx,
        inputs,
        p,
        method="dfq",
        equalize=p.equalize,
        absorb_high_bias=p.absorb_high_bias,
        correct_bias=p.correct_bias,
    )


def _pruning_metrics(result: Any, out: Artifact, before: int) -> dict[str, Any]:
    from slimline.compress.prune.structured import layer_widths

    total = sum(t.numel() for t in out.model.parameters())
    return {
        "channels_before": result.channels_before,
        "channels_after": result.channels_after,
        "sites": len(result.sites),
        "skipped": result.skipped,
        "params_before": before,
        "params_after": total,
        "params_ratio": total / before if before else 1.0,
        "layer_channels": layer_widths(out.model),
        "data_used": False,
    }


def _prune(
    ctx: StageContext,
    inputs: list[Artifact],
    p: PlainChannelsParams,
    *,
    compensation: Literal["merge", "none"],
    **merge: float,
) -> Artifact:
    from slimline.compress.prune.channel_groups import StructuredPruningError
    from slimline.compress.prune.layer_chains import LayerChainError
    from slimline.compress.prune.neuron_merging import prune_sites

    _float_input(ctx, inputs[0])
    out = inputs[0].derive(copy_model=True)
    before = sum(t.numel() for t in out.model.parameters())
    try:
        result = prune_sites(
            out.model,
            out.example_input(1),
            p.prune_ratio,
            criterion=p.criterion,
            compensation=compensation,
            mean_correction=p.mean_correction,
            masks=out.masks,
            **merge,
        )
    except (ValueError, LayerChainError, StructuredPruningError) as exc:
        raise ctx.fail(str(exc)) from None
    if p.prune_ratio > 0 and not result.sites:
        raise ctx.fail(
            "the model has no prune site (a layer -> BN -> ReLU -> next layer chain "
            f"whose channels nothing else reads); not pruned: {result.skipped}"
        )
    method = "neuron_merging" if compensation == "merge" else "plain_channels"
    out.state["pruning"] = {
        "method": method,
        "ratio": p.prune_ratio,
        "criterion": p.criterion,
        "mean_correction": p.mean_correction,
        **merge,
        "sites": result.sites,
    }
    out.metrics = _pruning_metrics(result, out, before)
    if compensation == "merge":
        out.metrics["merged"] = sum(s["merged"] for s in result.sites.values())
    ctx.log(
        f"{result.channels_before} -> {result.channels_after} site channels in "
        f"{len(result.sites)} sites"
    )
    return out


@register_stage("prune.plain_channels", PlainChannelsParams)
@data_free
def prune_plain_channels(
    ctx: StageContext, inputs: list[Artifact], p: PlainChannelsParams
) -> Artifact:
    """Baseline: remove the smallest-norm channels of each prune site, nothing repaired."""
    return _prune(ctx, inputs, p, compensation="none")


@register_stage("prune.neuron_merging", NeuronMergingParams)
@data_free
def prune_neuron_merging(
    ctx: StageContext, inputs: list[Artifact], p: NeuronMergingParams
) -> Artifact:
    """Neuron Merging (Kim 2020): each pruned filter merged into its most similar kept one."""
    return _prune(ctx, inputs, p, compensation="merge", threshold=p.threshold, lam=p.lam)


@register_stage("compress.udfc", UDFCParams, target_aware=True)
@data_free
def compress_udfc(ctx: StageContext, inputs: list[Artifact], p: UDFCParams) -> Artifact:
    """UDFC (Bai 2023): joint channel pruning + weight quantization, repaired in closed form."""
    from slimline.compress.prune.channel_groups import StructuredPruningError
    from slimline.compress.prune.layer_chains import LayerChainError
    from slimline.compress.quant.bn_statistics import DataFreeRangeError
    from slimline.compress.quant.udfc import udfc_compress

    _float_input(ctx, inputs[0])
    out = inputs[0].derive(copy_model=True)
    before = sum(t.numel() for t in out.model.parameters())
    try:
        result = udfc_compress(
            out.model,
            out.example_input(1),
            prune_ratio=p.prune_ratio,
            criterion=p.criterion,
            alpha1=p.alpha1,
            alpha2=p.alpha2,
            compensate_quantization=p.compensate_quantization,
            mean_correction=p.mean_correction,
            mean_preserving=p.mean_preserving,
            masks=out.masks,
            **_quant_kwargs(ctx, p),
        )
    except (ValueError, LayerChainError, StructuredPruningError, DataFreeRangeError) as exc:
        raise ctx.fail(str(exc)) from None
    if p.prune_ratio > 0 and not result.sites:
        raise ctx.fail(
            "the model has no prune site (a layer -> BN -> ReLU -> next layer chain "
            f"whose channels nothing else reads); not pruned: {result.skipped}"
        )
    if result.quant is None:  # weight_bits is always set here; a guard for the type checker
        raise ctx.fail("internal error: UDFC returned no quantization state")
    out.state["pruning"] = {
        "method": "udfc",
        "ratio": p.prune_ratio,
        "criterion": p.criterion,
        "alpha1": p.alpha1,
        "mean_correction": p.mean_correction,
        "mean_preserving": p.mean_preserving,
        "sites": result.sites,
    }
    out.state["quantization"] = result.quant.state.to_dict()
    out.metrics = {
        **_pruning_metrics(result, out, before),
        **_quant_metrics(result.quant, p, "udfc"),
        "udfc_seconds": result.seconds,
        "alpha1": p.alpha1,
        "alpha2": p.alpha2,
        "compensated_layers": len(result.compensated),
        "quantization_scales": result.compensated,
    }
    ctx.log(
        f"{result.channels_before} -> {result.channels_after} site channels, "
        f"{len(result.compensated)} layers rescaled, {result.seconds:.2f}s"
    )
    return out
