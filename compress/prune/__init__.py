"""Pruning: importance scores, sparsity allocation and mask application."""

from compress.prune.magnitude import (
    apply_masks,
    layer_sparsity,
    magnitude,
    magnitude_masks,
    prunable_weights,
)

__all__ = ["apply_masks", "layer_sparsity", "magnitude", "magnitude_masks", "prunable_weights"]
