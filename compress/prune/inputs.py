"""Data-free inputs for measuring output distortion without touching the training set.

* :func:`random_inputs` — i.i.d. N(0, 1) samples of the model's input shape. slimline's datasets
  are standardised to zero mean and unit variance, so this matches their first two moments.
* :func:`bn_matched_inputs` — N(0, 1) samples optimised so that every BatchNorm layer sees batch
  statistics equal to its running statistics (ZeroQ's "distilled data", Cai et al. CVPR 2020).
  Costs a few hundred forward/backward passes; needs a model with BatchNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCH_NORMS) for m in model.modules())


def random_inputs(input_shape: Sequence[int], samples: int, *, seed: int = 0) -> torch.Tensor:
    """``samples`` N(0, 1) inputs of shape ``(samples, *input_shape)`` from a fixed seed."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((samples, *input_shape), generator=generator)


def bn_matched_inputs(
    model: nn.Module,
    input_shape: Sequence[int],
    samples: int,
    *,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Inputs whose per-channel BatchNorm batch statistics match the running ones (ZeroQ).

    Minimises ``sum_bn ||mu_batch - mu_running||^2 + ||sigma_batch - sigma_running||^2`` over
    the inputs with Adam, starting from :func:`random_inputs`. The model's weights and mode are
    left untouched. Raises ``ValueError`` if the model has no BatchNorm layer.
    """
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    if not norms:
        raise ValueError(
            "BN-matched inputs need BatchNorm layers and this model has none; "
            "use random inputs or a calibration batch"
        )
    if samples < 2:
        raise ValueError("BN-matched inputs need at least 2 samples to form batch statistics")
    inputs = random_inputs(input_shape, samples, seed=seed).requires_grad_(True)
    losses: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], _output: object) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]  # all but the channel axis
        mean = x.mean(dim=dims)
        std = (x.var(dim=dims, unbiased=False) + module.eps).sqrt()
        losses.append(
            (mean - module.running_mean).pow(2).sum()
            + (std - (module.running_var + module.eps).sqrt()).pow(2).sum()
        )

    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    handles = [m.register_forward_hook(record) for m in norms]
    model.eval()  # use running statistics, never update them
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam([inputs], lr=lr)
    try:
        for _ in range(steps):
            losses.clear()
            model(inputs)
            loss = torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
    return inputs.detach()
