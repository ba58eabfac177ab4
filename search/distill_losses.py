"""Kept for existing imports: the distillation losses live in :mod:`slimline.search.distill`."""

from slimline.search.distill import distillation_loss_fn, hinton_kd_loss

__all__ = ["distillation_loss_fn", "hinton_kd_loss"]
