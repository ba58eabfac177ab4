"""Quantization-aware training: LSQ and StatsQ weight quantizers, LSQ activations, oscillation
tracking (Nagel et al., 2022) and the OFQ techniques CGA and QKR (Liu et al., ICML 2023)."""

from slimline.compress.quant.qat.cga import FrozenWeights, boundary_distance, confident_mask
from slimline.compress.quant.qat.config import QATConfig
from slimline.compress.quant.qat.lsq import LSQQuantizer, lsq_quantize
from slimline.compress.quant.qat.model import QATController
from slimline.compress.quant.qat.oscillation import OscillationTracker
from slimline.compress.quant.qat.qkr import merged_query_key, qkr_attention
from slimline.compress.quant.qat.statsq import (
    StatsQQuantizer,
    statsq_integer_levels,
    statsq_quantize,
    statsq_scale,
    statsq_spec,
)

__all__ = [
    "FrozenWeights",
    "LSQQuantizer",
    "OscillationTracker",
    "QATConfig",
    "QATController",
    "StatsQQuantizer",
    "boundary_distance",
    "confident_mask",
    "lsq_quantize",
    "merged_query_key",
    "qkr_attention",
    "statsq_integer_levels",
    "statsq_quantize",
    "statsq_scale",
    "statsq_spec",
]
