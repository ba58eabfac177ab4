"""The pruning stages: thin adapters from an Artifact to :func:`slimline.compress.methods.prune`.

Each stage's schema is the method's config (the Python API and recipes share it); data-free
methods run under :func:`slimline.stage.no_data`, so "data-free" is enforced, not claimed.

=======================  ============================================================
``prune.magnitude``      :class:`~slimline.compress.prune.magnitude.MagnitudeConfig`
``prune.unstructured``   :class:`~slimline.compress.prune.unstructured.UnstructuredConfig`
``prune.channels``       :class:`~slimline.compress.prune.channels.ChannelConfig`
``prune.nm``             :class:`~slimline.compress.prune.nm.NMConfig`
``prune.plain_channels`` :class:`~slimline.compress.prune.sites.PlainChannelsConfig`
``prune.neuron_merging`` :class:`~slimline.compress.prune.sites.NeuronMergingConfig`
``prune.pdp``            :class:`~slimline.compress.prune.pdp.PDPConfig` (trains: needs data)
=======================  ============================================================
"""

from __future__ import annotations

import contextlib
from typing import Any

from slimline.artifact import Artifact
from slimline.compress.methods import MethodError, PruneResult, prune
from slimline.compress.prune.channels import ChannelConfig
from slimline.compress.prune.magnitude import MagnitudeConfig
from slimline.compress.prune.nm import NMConfig
from slimline.compress.prune.pdp import PDPConfig
from slimline.compress.prune.sites import NeuronMergingConfig, PlainChannelsConfig
from slimline.compress.prune.unstructured import UnstructuredConfig
from slimline.io import write_json
from slimline.plots import plot_layer_channels, plot_layer_sparsity
from slimline.stage import StageContext, no_data, register_stage


def run_pruner(ctx: StageContext, inputs: list[Artifact], config: Any) -> tuple[Artifact,
                                                                                PruneResult]:
    """Prune a copy of the input model with ``config``; earlier masks stay and compose."""
    out = inputs[0].derive(copy_model=True)
    guard = no_data(ctx) if not config.uses_data() else contextlib.nullcontext()
    with guard:
        try:
            result = prune(out.model, config, data=ctx.data if config.uses_data() else None,
                           masks=out.masks, example_input=out.example_input(1), seed=ctx.seed,
                           input_spec=out.inputs,
                           progress=ctx.progress)
        except MethodError as exc:
            raise ctx.fail(str(exc)) from None
    out.model, out.masks, out.metrics = result.model, result.masks, result.metrics
    previous = out.state.get("pruning")
    out.state["pruning"] = {**result.record, **({"previous": previous} if previous else {})}
    return out, result


def _with_sparsity_chart(ctx: StageContext, out: Artifact, title: str) -> Artifact:
    out.files["layer_sparsity_png"] = plot_layer_sparsity(
        out.metrics["layer_sparsity"], ctx.work_dir / "layer_sparsity.png",
        title=f"{ctx.stage_id}: {title}")
    return out


@register_stage("prune.magnitude", MagnitudeConfig)
def prune_magnitude(ctx: StageContext, inputs: list[Artifact], p: MagnitudeConfig) -> Artifact:
    """Unstructured magnitude pruning, global or uniform; masks kept for fine-tuning."""
    return run_pruner(ctx, inputs, p)[0]


@register_stage("prune.nm", NMConfig)
def prune_nm(ctx: StageContext, inputs: list[Artifact], p: NMConfig) -> Artifact:
    """N:M sparsity (N largest |w| per M input weights); masks kept so `train` preserves them."""
    return run_pruner(ctx, inputs, p)[0]


@register_stage("prune.unstructured", UnstructuredConfig)
def prune_unstructured(ctx: StageContext, inputs: list[Artifact],
                       p: UnstructuredConfig) -> Artifact:
    """Layer-adaptive unstructured pruning: uniform, global, LAMP, DIMAP or rate-distortion DP."""
    out, result = run_pruner(ctx, inputs, p)
    if "distortion_curves" in result.extras:
        out.files["distortion_curves"] = write_json(ctx.work_dir / "distortion_curves.json",
                                                    result.extras["distortion_curves"])
    return _with_sparsity_chart(ctx, out, f"{p.allocation}/{p.score}, target {p.sparsity:.0%}")


@register_stage("prune.channels", ChannelConfig)
def prune_channels(ctx: StageContext, inputs: list[Artifact], p: ChannelConfig) -> Artifact:
    """Structured pruning: remove channels/heads (DepGraph-coupled) to a channel, FLOPs or
    latency target."""
    out, result = run_pruner(ctx, inputs, p)
    if "latency_table" in result.extras:  # measured here: kept for reuse on this machine
        out.files["latency_table"] = result.extras["latency_table"].save(
            ctx.work_dir / "layer_latency.json")
    m = out.metrics
    out.files["channels_png"] = plot_layer_channels(
        m["layer_channels"], ctx.work_dir / "channels.png",
        title=f"{ctx.stage_id}: {p.allocation}, {p.ratio:.0%} of {p.target}, FLOPs x"
        f"{m['flops_ratio']:.2f}")
    ctx.log(f"kept {1 - m['channels_removed']:.1%} of prunable channels, FLOPs "
            f"{m['flops_ratio']:.1%}, params {m['params_ratio']:.1%}")
    return out


@register_stage("prune.plain_channels", PlainChannelsConfig)
def prune_plain_channels(ctx: StageContext, inputs: list[Artifact],
                         p: PlainChannelsConfig) -> Artifact:
    """Baseline: remove the smallest-norm channels of each prune site, nothing repaired."""
    return _sites(ctx, inputs, p)


@register_stage("prune.neuron_merging", NeuronMergingConfig)
def prune_neuron_merging(ctx: StageContext, inputs: list[Artifact],
                         p: NeuronMergingConfig) -> Artifact:
    """Neuron Merging (Kim 2020): each pruned filter merged into its most similar kept one."""
    return _sites(ctx, inputs, p)


def _sites(ctx: StageContext, inputs: list[Artifact], p: PlainChannelsConfig) -> Artifact:
    if "quantization" in inputs[0].state:
        method = inputs[0].state["quantization"].get("method", "?")
        raise ctx.fail(f"the input model is already quantized (method {method!r}); give this "
                       "stage the float model")
    out = run_pruner(ctx, inputs, p)[0]
    ctx.log(f"{out.metrics['channels_before']} -> {out.metrics['channels_after']} site "
            f"channels in {out.metrics['sites']} sites")
    return out


@register_stage("prune.pdp", PDPConfig)
def prune_pdp(ctx: StageContext, inputs: list[Artifact], p: PDPConfig) -> Artifact:
    """Parameter-free differentiable pruning while training (optionally distilled)."""
    out = run_pruner(ctx, inputs, p)[0]
    return _with_sparsity_chart(ctx, out, f"PDP {p.method}, target "
                                          f"{out.metrics['target_sparsity']:.0%}")
