"""Small models for the data-free compression tests (UDFC, DFQ, Neuron Merging)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from slimline.stage import StageContext


@torch.no_grad()
def calibrate_bn(
    model: nn.Module, input_shape: Sequence[int], batches: int = 20, seed: int = 0
) -> nn.Module:
    """Give every BatchNorm running statistics of N(0, 1) inputs (no training), then eval()."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: exact statistics of these batches
    model.train()
    for _ in range(batches):
        model(torch.randn((64, *input_shape), generator=generator))
    return model.eval()


@torch.no_grad()
def combination_net(
    combination: Sequence[float], *, always_active: bool, seed: int = 0
) -> tuple[nn.Sequential, int]:
    """``conv -> BN -> ReLU -> conv`` whose last channel ``j`` is, before the ReLU, exactly
    ``sum_i combination[i] * z_i`` of the channels before it (BN included): ``scale_j W_j =
    sum_i c_i scale_i W_i`` and ``K_j = sum_i c_i K_i``. Returns (model, j).

    ``always_active``: large BN betas keep every channel positive on inputs in [-1, 1], so the
    ReLU is the identity there and any combination survives it. Otherwise use a single positive
    coefficient (``relu(c z) = c relu(z)``). ``W_j`` gets the smallest L1/L2 norm (a large
    ``gamma_j``) so filter-norm selection prunes exactly channel ``j``.
    """
    generator = torch.Generator().manual_seed(seed)
    coefficients = torch.tensor(combination, dtype=torch.float32)
    kept = len(coefficients)
    model = nn.Sequential(
        nn.Conv2d(3, kept + 1, 3, padding=1, bias=False),
        nn.BatchNorm2d(kept + 1),
        nn.ReLU(),
        nn.Conv2d(kept + 1, 4, 3, padding=1),
    )
    conv, norm = model[0], model[1]
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    norm.running_mean.copy_(torch.randn(kept + 1, generator=generator) * 0.1)
    norm.running_var.copy_(torch.rand(kept + 1, generator=generator) + 0.5)
    norm.weight.copy_(torch.rand(kept + 1, generator=generator) + 0.5)
    norm.bias.copy_(
        (torch.rand(kept + 1, generator=generator) + 0.5) * (200.0 if always_active else 1.0)
    )
    sigma = torch.sqrt(norm.running_var + norm.eps)
    scale = norm.weight / sigma
    shift = norm.bias - scale * norm.running_mean
    j = kept
    norm.weight[j] = 20.0 * norm.weight[:kept].max()  # large gamma_j: small W_j, pruned first
    scale_j = norm.weight[j] / sigma[j]
    conv.weight[j] = (
        torch.einsum("i,i,ichw->chw", coefficients, scale[:kept], conv.weight[:kept]) / scale_j
    )
    target_shift = (coefficients * shift[:kept]).sum()
    norm.bias[j] = target_shift + scale_j * norm.running_mean[j]
    model[3].weight.copy_(torch.randn(model[3].weight.shape, generator=generator))
    return model.eval(), j


def tripwire_context(stage_id: str, uses: str, work_dir: Any) -> StageContext:
    """A stage context whose dataset loader fails the test if anything calls it."""

    def loader() -> Any:
        raise AssertionError(f"{uses} read the dataset")

    return StageContext(
        stage_id=stage_id,
        uses=uses,
        seed=0,
        work_dir=work_dir,
        data_loader=loader,
        show_progress=False,
    )
