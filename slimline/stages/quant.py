"""The quantization stages: thin adapters from an Artifact to
:func:`slimline.compress.methods.quantize`, for the recipe's deployment target (``ctx.target``).

=====================  ===========================================================================
``quant.rtn``          :class:`~slimline.compress.quant.rtn.RTNConfig` (calibrates on data)
``quant.datafree``     :class:`~slimline.compress.quant.datafree.DataFreeConfig` (no data)
``quant.dfq``          :class:`~slimline.compress.quant.datafree.DFQConfig` (no data)
``compress.udfc``      :class:`~slimline.compress.quant.udfc.UDFCConfig` (prunes too; no data)
``quant.qat``          :class:`~slimline.compress.quant.qat.config.QATConfig` (trains on data)
=====================  ===========================================================================

Data-free methods run under :func:`slimline.stage.no_data`: reading the dataset is an error.
"""

from __future__ import annotations

import contextlib
from typing import Any

from slimline.artifact import Artifact
from slimline.compress.methods import MethodError, QuantizeResult, quantize
from slimline.compress.quant.datafree import DataFreeConfig, DFQConfig
from slimline.compress.quant.qat.config import QATConfig
from slimline.compress.quant.rtn import RTNConfig
from slimline.compress.quant.udfc import UDFCConfig
from slimline.plots import plot_oscillation
from slimline.stage import StageContext, no_data, register_stage
from slimline.training import world


def run_quantizer(ctx: StageContext, inputs: list[Artifact], config: Any) -> tuple[Artifact,
                                                                                  QuantizeResult]:
    """Quantize a copy of the (float) input model with ``config`` for ``ctx.target``."""
    source = inputs[0]
    if "quantization" in source.state:
        method = source.state["quantization"].get("method", "?")
        raise ctx.fail(f"the input model is already quantized (method {method!r}); quantize "
                       "the float model instead")
    out = source.derive(copy_model=True)
    guard = no_data(ctx) if not config.uses_data() else contextlib.nullcontext()
    with guard:
        try:
            result = quantize(out.model, config, data=ctx.data if config.uses_data() else None,
                              target=ctx.target, masks=out.masks,
                              example_input=out.example_input(1), seed=ctx.seed,
                              progress=ctx.progress, input_spec=out.inputs)
        except MethodError as exc:
            raise ctx.fail(str(exc)) from None
    out.state["quantization"] = result.state.to_dict()
    if result.pruning is not None:
        out.state["pruning"], out.masks = result.pruning, result.masks
    out.metrics = result.metrics
    return out, result


@register_stage("quant.rtn", RTNConfig, target_aware=True)
def quant_rtn(ctx: StageContext, inputs: list[Artifact], p: RTNConfig) -> Artifact:
    """Round-to-nearest per-channel weights + min/max activation calibration (BN folded)."""
    return run_quantizer(ctx, inputs, p)[0]


@register_stage("quant.datafree", DataFreeConfig, target_aware=True)
def quant_datafree(ctx: StageContext, inputs: list[Artifact], p: DataFreeConfig) -> Artifact:
    """Round-to-nearest weights, activation ranges from BN statistics; never reads data."""
    return run_quantizer(ctx, inputs, p)[0]


@register_stage("quant.dfq", DFQConfig, target_aware=True)
def quant_dfq(ctx: StageContext, inputs: list[Artifact], p: DFQConfig) -> Artifact:
    """DFQ (Nagel 2019): equalization, high-bias absorption, bias correction; no data."""
    return run_quantizer(ctx, inputs, p)[0]


@register_stage("compress.udfc", UDFCConfig, target_aware=True)
def compress_udfc(ctx: StageContext, inputs: list[Artifact], p: UDFCConfig) -> Artifact:
    """UDFC (Bai 2023): joint channel pruning + weight quantization, repaired in closed form."""
    return run_quantizer(ctx, inputs, p)[0]


@register_stage("quant.qat", QATConfig, target_aware=True)
def quant_qat(ctx: StageContext, inputs: list[Artifact], p: QATConfig) -> Artifact:
    """Low-bit QAT: LSQ, or OFQ (StatsQ + CGA + QKR); tracks weight oscillation."""
    out, result = run_quantizer(ctx, inputs, p)
    if world()[0] == 0:
        out.files["oscillation_plot"] = plot_oscillation(
            result.extras["history"], ctx.work_dir / "oscillation.png",
            f"{result.extras['method']} W{p.weight_bits}A{p.activation_bits}")
    return out
