"""UDFC's two closed-form repairs (Bai et al., 2023, "Unified Data-Free Compression: Pruning
and Quantization without Fine-Tuning", ICCV, sec. 3), pure functions on a layer's filters; the
pass over a model is :func:`slimline.compress.quant.udfc.udfc_compress`. Layer ``l`` (Conv +
BN with ``gamma, beta, mu, sigma`` + ReLU) feeds layer ``l+1``. Write channel ``c``'s
pre-activation as ``z_c = scale_c (W_c . x) + K_c`` with ``scale = gamma / sigma`` and
``K = beta - gamma mu / sigma`` (:class:`~slimline.compress.prune.datafree_sites.ChannelFilters`).

**Pruning.** A pruned channel ``j`` is assumed to be a linear combination of the kept channels
``i``, ``a_j ~ sum_i s_i a_i``; layer ``l+1`` then reads the same input if its column ``i``
absorbs ``s_i`` times column ``j``. The scales minimise the reconstruction error of ``z_j``::

    L(s) = || sum_i s_i G_i - V ||^2 + alpha1 (sum_i s_i K_i - K_j)^2,
    G_i = (gamma_i sigma_j) / (sigma_i gamma_j) vec(W_i),   V = vec(W_j)

whose stationarity condition is the paper's closed form ``(G G^T + alpha1 k k^T) s = G V +
alpha1 K_j k``. That system is singular when there are more kept channels than filter entries,
so :func:`pruning_scales` solves the stacked least-squares problem ``[G^T; sqrt(alpha1) k^T] s
~ [V; sqrt(alpha1) K_j]`` (minimum-norm solution, SVD-based), after multiplying both rows by
``scale_j`` (same minimiser, and a channel with ``gamma_j = 0`` gets ``s = 0`` instead of a
division by zero).

**Quantization.** Kept channel ``m`` is quantized, ``R_m = scale_m vec(W_m)`` (its BN-folded
filter, which is what gets int8 levels) becoming ``R~_m``, and layer ``l+1``'s input channel
``m`` is multiplied by ``s~_m`` so that ``s~ z~_m`` matches ``z_m``::

    L(s~) = || R_m - s~ R~_m ||^2 + alpha2 ((1 - s~) K_m)^2
    s~_m = (R~_m . R_m + alpha2 K_m^2) / (R~_m . R~_m + alpha2 K_m^2)

(setting ``dL/ds~ = 0``: ``-R~.(R - s~ R~) - alpha2 K^2 (1 - s~) = 0``). The closed form
printed as the paper's eq. 21 is reported to reduce to 1, which is not this minimiser; we use
the derivation above, and tests/test_udfc.py checks it against a numerical minimum.

Both assumptions hold exactly only for a positively homogeneous activation: ``relu(s z) = s
relu(z)`` needs ``s >= 0``, so a combination with mixed-sign scales is an approximation after
the ReLU even when ``z_j`` is reconstructed exactly (it is exact when the channels involved are
always active, or when ``z_j`` is a positive multiple of one kept channel). ReLU6
(MobileNetV2) is homogeneous only below its clip at 6.

Both fits are least squares over an implicitly isotropic, zero-mean input, so both shrink
towards 0: when the kept filters explain little of ``R_j`` the scales ``s`` come out small
with mixed signs, and ``sum_i s_i E[a_i]`` no longer matches the pruned channel's mean output
``E[a_j] > 0``; likewise ``s~ < 1`` on average. bench/bench_udfc.py measures this (RESULTS.md:
on its small models ``s`` fitted to data activations keeps ~95% accuracy at 30% pruning, the
weight-space ``s`` does not). Two opt-in extensions restore that mean from BN statistics:
``mean_correction`` through the next layer's bias, ``mean_preserving`` inside ``s`` itself.
"""

from __future__ import annotations

import torch

from slimline.compress.prune.datafree_sites import ChannelFilters

__all__ = ["pruning_loss", "pruning_scales", "quantization_loss", "quantization_scales"]


def pruning_loss(
    scales: torch.Tensor, filters: ChannelFilters, pruned: int, kept: torch.Tensor, alpha1: float
) -> torch.Tensor:
    """The UDFC pruning objective ``L(s)`` above for pruned channel ``pruned`` (float64)."""
    ratio = filters.scale[kept] / filters.scale[pruned]
    g = ratio[:, None] * filters.weight[kept]
    weight_term = (scales.double() @ g - filters.weight[pruned]).pow(2).sum()
    bias_term = (scales.double() @ filters.shift[kept] - filters.shift[pruned]) ** 2
    return weight_term + alpha1 * bias_term


def pruning_scales(
    filters: ChannelFilters,
    removed: torch.Tensor,
    alpha1: float,
    means: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form ``s`` (rows: ``removed`` channels; columns: kept channels, increasing index)
    minimising :func:`pruning_loss` for each removed channel.

    ``means`` (per channel ``E[a_c]`` after the activation; not in the paper): each row instead
    minimises the same loss subject to ``sum_i s_i means_i = means_j``, so the next layer keeps
    the pruned channel's mean input (equality-constrained least squares, solved on the null
    space of the constraint). Rows whose kept means are all zero stay unconstrained.
    """
    if alpha1 < 0:
        raise ValueError(f"alpha1 must be >= 0, got {alpha1}")
    channels = filters.weight.shape[0]
    if means is not None and means.shape != (channels,):
        raise ValueError(f"means must have one entry per channel ({channels}), got {means.shape}")
    keep = torch.ones(channels, dtype=torch.bool)
    keep[removed] = False
    kept = torch.nonzero(keep).flatten()
    folded = filters.scale[kept, None] * filters.weight[kept]  # R_i = scale_i W_i
    root = alpha1**0.5
    rows = []
    for j in removed.tolist():
        # (scale_j x) both residuals: sum_i s_i R_i - R_j and sqrt(a1) scale_j (s.k - K_j).
        matrix = torch.cat([folded.T, root * filters.scale[j] * filters.shift[kept][None]], 0)
        target = torch.cat(
            [
                filters.scale[j] * filters.weight[j],
                (root * filters.scale[j] * filters.shift[j]).reshape(1),
            ]
        )
        if means is None:
            rows.append(_least_squares(matrix, target))
        else:
            rows.append(_mean_constrained(matrix, target, means[kept].double(), means[j]))
    if not rows:
        return torch.zeros(0, len(kept), dtype=torch.float64)
    return torch.stack(rows)


def _least_squares(matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minimum-norm ``argmin ||matrix s - target||`` (SVD-based: rank-deficient is fine)."""
    if matrix.shape[1] == 0:
        return matrix.new_zeros(0)
    return torch.linalg.lstsq(matrix, target[:, None], driver="gelsd").solution[:, 0]


def _mean_constrained(
    matrix: torch.Tensor, target: torch.Tensor, kept_means: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """``argmin ||matrix s - target||`` subject to ``kept_means . s = mean``: ``s = s0 + N t``
    with ``s0`` the smallest feasible point and ``N`` an orthonormal basis of the constraint's
    null space (the trailing columns of a complete QR of ``kept_means``)."""
    norm2 = kept_means.dot(kept_means)
    if norm2 == 0:
        return _least_squares(matrix, target)
    base = kept_means * (mean / norm2)
    basis = torch.linalg.qr(kept_means[:, None], mode="complete").Q[:, 1:]
    free = _least_squares(matrix @ basis, target - matrix @ base)
    return base + basis @ free


def quantization_loss(
    scale: torch.Tensor | float,
    folded: torch.Tensor,
    quantized: torch.Tensor,
    shift: torch.Tensor | float,
    alpha2: float,
) -> torch.Tensor:
    """The UDFC quantization objective ``L(s~)`` above for one channel (float64)."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    shift = torch.as_tensor(shift, dtype=torch.float64)
    error = (folded.double() - scale * quantized.double()).pow(2).sum()
    return error + alpha2 * ((1 - scale) * shift) ** 2


def quantization_scales(
    folded: torch.Tensor, quantized: torch.Tensor, shift: torch.Tensor, alpha2: float
) -> torch.Tensor:
    """``s~_m = (R~_m . R_m + alpha2 K_m^2) / (R~_m . R~_m + alpha2 K_m^2)`` per output channel
    (rows of ``folded``/``quantized``); 1 where the denominator vanishes."""
    if alpha2 < 0:
        raise ValueError(f"alpha2 must be >= 0, got {alpha2}")
    r = folded.double().flatten(1)
    q = quantized.double().flatten(1)
    k2 = alpha2 * shift.double() ** 2
    numerator = (q * r).sum(1) + k2
    denominator = (q * q).sum(1) + k2
    ok = denominator > 0
    return torch.where(
        ok,
        numerator / torch.where(ok, denominator, torch.ones_like(denominator)),
        torch.ones_like(denominator),
    )
