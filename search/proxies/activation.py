"""Activation-based proxies: NASWOT, Zen-NAS and the RNN hidden-state covariance.

They read what the untrained network computes on the mini-batch (taps from
:mod:`slimline.search.features`), not its weight gradients.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from slimline.search.features import find_global_pool, find_recurrent, relu_modules, tap
from slimline.search.proxies.base import Proxy, ProxyInputs, correlation_eigen_score, register_proxy

__all__ = ["HiddenCov", "Naswot", "Zen", "naswot_kernel_logdet", "zen_score"]


def naswot_kernel_logdet(codes: torch.Tensor) -> float:
    """``log |K_H|`` with ``K_H[i, j] = N_A - d_H(c_i, c_j)`` (Mellor et al., ICML 2021, eq. 2):
    ``c_i`` is sample ``i``'s binary ReLU code over all ``N_A`` units and ``d_H`` the Hamming
    distance, so ``K_H = C C^T + (1 - C)(1 - C)^T``. Float64; ``-inf`` when two samples share
    a code (the kernel is singular)."""
    c = codes.reshape(codes.shape[0], -1).to(torch.float64)
    kernel = c @ c.t() + (1.0 - c) @ (1.0 - c).t()
    sign, logabsdet = torch.linalg.slogdet(kernel)
    return float(logabsdet) if float(sign) > 0 else -math.inf


@register_proxy
class Naswot(Proxy):
    """NASWOT: log-determinant of the binary ReLU-code kernel over the mini-batch. Networks
    that map different inputs to more different activation patterns score higher = better.
    Needs ``nn.ReLU`` modules (train mode, batch-statistics BatchNorm, as the paper's code)."""

    name = "naswot"

    def applicable(self, model: nn.Module) -> bool:
        return bool(relu_modules(model))

    def why_not_applicable(self, model: nn.Module) -> str:
        return "it has no nn.ReLU module to read binary activation codes from"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        model.train()
        with torch.no_grad():
            found = tap(model, inputs.x, relu_inputs=True)
        batch = inputs.x.shape[0]
        codes = torch.cat([(a > 0).reshape(batch, -1) for a in found.relu_inputs], dim=1)
        return naswot_kernel_logdet(codes)


def zen_score(
    feature_map: torch.Tensor, perturbed_map: torch.Tensor, bn_variances: list[torch.Tensor]
) -> float:
    """Zen-NAS score (Lin et al., ICCV 2021, eq. 5-6 and Algorithm 1):
    ``log E_n ||f(x_n) - f(x_n + alpha eps_n)||_F + sum_i log sqrt(mean_j sigma_{i,j}^2)``
    with ``f`` the pre-GAP feature map and ``sigma_{i,j}^2`` the batch variance of channel
    ``j`` entering BatchNorm ``i`` (the term that undoes BN's normalisation of the scale).

    The Frobenius norm is per sample, averaged over the batch; the paper's ``1/alpha`` is a
    constant offset of the log and is left out, as in the official code."""
    diff = (feature_map - perturbed_map).reshape(feature_map.shape[0], -1)
    delta = diff.norm(dim=1).mean()
    bn_term = sum(float(torch.log(torch.sqrt(v.mean()))) for v in bn_variances)
    return float(torch.log(delta)) + bn_term


def _gaussian_init(model: nn.Module) -> None:
    """Zen-NAS's initialisation: Conv/Linear weights ~ N(0, 1), biases 0, BN affine = (1, 0)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


@register_proxy
class Zen(Proxy):
    """Zen-NAS expressivity score on a Gaussian-initialised copy of the model (the model passed
    in is not changed), Gaussian inputs of the mini-batch's shape and perturbation
    ``alpha = 0.01``. Higher = more expressive = better. Needs a global average pool (the
    pre-GAP map is what the paper perturbs)."""

    name = "zen"
    alpha: float = 0.01

    def applicable(self, model: nn.Module) -> bool:
        return find_global_pool(model) is not None

    def why_not_applicable(self, model: nn.Module) -> str:
        return "it has no global average pooling module, so there is no pre-GAP feature map"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        net = copy.deepcopy(model)
        _gaussian_init(net)
        net.train()
        x = torch.randn_like(inputs.x)
        perturbed = x + self.alpha * torch.randn_like(inputs.x)
        variances: list[torch.Tensor] = []

        def keep_variance(_module, args, _output) -> None:
            a = args[0]
            dims = [d for d in range(a.dim()) if d != 1]
            variances.append(a.var(dim=dims, unbiased=False))

        batchnorms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        with torch.no_grad():
            perturbed_map = tap(net, perturbed, pre_pool=True).pre_pool
            handles = [m.register_forward_hook(keep_variance) for m in batchnorms]
            try:
                feature_map = tap(net, x, pre_pool=True).pre_pool
            finally:
                for handle in handles:
                    handle.remove()
        return zen_score(feature_map, perturbed_map, variances)


@register_proxy
class HiddenCov(Proxy):
    """Hidden covariance (Serianni & Kalita, ACL 2023 SRW, "Training-free Neural Architecture
    Search for RNNs and Transformers", sec. 3): the Jacobian-covariance score applied to the
    hidden states of the last recurrent layer, ``-sum_i [log(lambda_i + k) + 1/(lambda_i +
    k)]`` over the eigenvalues of the correlation matrix between samples (each sample's states
    at all time steps, flattened). Less correlated hidden states = higher = better."""

    name = "hidden_cov"

    def applicable(self, model: nn.Module) -> bool:
        return find_recurrent(model) is not None

    def why_not_applicable(self, model: nn.Module) -> str:
        return "it has no recurrent module (nn.RNN/GRU/LSTM); hidden_cov is for RNNs"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        model.train()
        with torch.no_grad():
            states = tap(model, inputs.x, hidden_states=True).hidden_states
        return correlation_eigen_score(states)
