"""Pruning: importance scores, sparsity allocation (incl. rate-distortion DP), unstructured,
structured (channels/heads over a dependency graph) and N:M masks.

Everything here works on a plain ``nn.Module``; the recipe stages in ``slimline.stages`` only wire
these functions to artifacts.
"""

from slimline.compress.prune.allocation import (
    dp_allocation,
    keep_budget,
    masks_from_counts,
    threshold_allocation,
    uniform_allocation,
)
from slimline.compress.prune.channel_allocation import allocate
from slimline.compress.prune.channel_cost import CostModel, build_cost_model
from slimline.compress.prune.distortion import additivity, distortion_curves, output_distortion
from slimline.compress.prune.dp import allocate_dp, allocate_dp_reference, quantize_cost
from slimline.compress.prune.flops import FlopCount, count_flops, count_params
from slimline.compress.prune.importance import (
    DIMAPImportance,
    Importance,
    LAMPImportance,
    MagnitudeImportance,
    ModuleRule,
    lamp_scores,
    make_importance,
)
from slimline.compress.prune.magnitude import (
    apply_masks,
    layer_sparsity,
    magnitude,
    magnitude_masks,
    prunable_weights,
)
from slimline.compress.prune.nm import NMError, nm_mask, nm_masks, nm_prune, nm_violations
from slimline.compress.prune.rate_distortion import rd_allocation
from slimline.compress.prune.structured import (
    ChannelImportance,
    ChannelMagnitudeImportance,
    ChannelPruningResult,
    StructuredPruningError,
    find_channel_groups,
    layer_widths,
    prune_channels,
)

__all__ = [
    "ChannelImportance", "ChannelMagnitudeImportance", "ChannelPruningResult", "CostModel",
    "DIMAPImportance", "FlopCount", "Importance", "LAMPImportance", "MagnitudeImportance",
    "ModuleRule", "NMError", "StructuredPruningError", "additivity", "allocate", "allocate_dp",
    "allocate_dp_reference", "apply_masks", "build_cost_model", "count_flops", "count_params",
    "distortion_curves", "dp_allocation", "find_channel_groups", "keep_budget", "lamp_scores",
    "layer_sparsity", "layer_widths", "magnitude", "magnitude_masks", "make_importance",
    "masks_from_counts", "nm_mask", "nm_masks", "nm_prune", "nm_violations",
    "output_distortion", "prunable_weights", "prune_channels", "quantize_cost", "rd_allocation",
    "threshold_allocation", "uniform_allocation",
]
