"""compress: the math of making models smaller (pruning, quantization), free of recipes and CLI."""

from slimline.compress import prune

__all__ = ["prune"]
