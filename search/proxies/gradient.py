"""Gradient-based saliency proxies (Abdelfattah et al., ICLR 2021, "Zero-Cost Proxies for
Lightweight NAS") and the Jacobian covariance of Mellor et al. (2020, v1).

All use the fixed mini-batch, the cross-entropy loss ``L`` and the weights of Conv/Linear
layers (plus RNN weight matrices; :func:`~slimline.search.proxies.base.scored_weights`), with the model
in train mode (BatchNorm uses batch statistics) except synflow, which is data-free.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimline.search.proxies.base import (
    Proxy,
    ProxyInputs,
    correlation_eigen_score,
    cross_entropy_backward,
    register_proxy,
    scored_weights,
    weight_layers,
)

__all__ = ["Fisher", "GradNorm", "Grasp", "JacobCov", "Snip", "Synflow"]


def _grads(weights: list[nn.Parameter]) -> list[torch.Tensor]:
    return [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]


@register_proxy
class GradNorm(Proxy):
    """``sum_l ||dL/dW_l||_2``: the per-layer Frobenius norms of the loss gradient, summed
    (Abdelfattah et al., sec. 3). Larger gradients = more trainable = better."""

    name = "grad_norm"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        weights = scored_weights(model)
        cross_entropy_backward(model, inputs)
        return float(sum(g.norm() for g in _grads(weights)))


@register_proxy
class Snip(Proxy):
    """SNIP connection sensitivity ``sum |theta * dL/dtheta|`` (Lee et al., ICLR 2019, eq. 6,
    without the per-network normalisation, as Abdelfattah et al. sum it). Higher = better."""

    name = "snip"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        weights = scored_weights(model)
        cross_entropy_backward(model, inputs)
        return float(sum((w.detach() * g).abs().sum() for w, g in zip(weights, _grads(weights))))


@register_proxy
class Grasp(Proxy):
    """GraSP ``sum -theta * (H g)`` with ``g = dL/dtheta`` and ``H`` the Hessian of ``L``
    (Wang et al., ICLR 2020, eq. 8), summed over weights as Abdelfattah et al. do. GraSP prunes
    the weights with the largest ``-theta H g`` (removing them reduces gradient flow least), so
    the sum is large when many weights do not help gradient flow; the zero-cost literature
    still ranks with the sum as is (higher = better), and so do we."""

    name = "grasp"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        weights = scored_weights(model)
        model.train()
        model.zero_grad(set_to_none=True)
        # Hessian-vector products differentiate twice: the fused attention kernels have no
        # second derivative on CPU (torch's own MultiheadAttention picks them), the math one has.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            loss = F.cross_entropy(model(inputs.x), inputs.y)
            grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
            pairs = [(w, g) for w, g in zip(weights, grads) if g is not None]
            # z = g_graph . g_const; dz/dtheta = H g (g held constant).
            z = sum((g * g.detach()).sum() for _, g in pairs)
            hessian_grad = torch.autograd.grad(z, [w for w, _ in pairs])
        return float(sum((-w.detach() * hg).sum() for (w, _), hg in zip(pairs, hessian_grad)))


@register_proxy
class Fisher(Proxy):
    """Fisher information of channels (Theis et al., 2018; Turner et al., ICLR 2020):
    ``sum_{layers, channels c} 0.5 * mean_n (sum_{spatial} a_{n,c} * dL/da_{n,c})^2`` with ``a``
    the output of each Conv/Linear layer (Abdelfattah et al.'s form). Higher = better."""

    name = "fisher"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        records: list[tuple[torch.Tensor, int]] = []
        grads: dict[int, torch.Tensor] = {}

        def keep(module: nn.Module, _args, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            index = len(records)
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            records.append((output.detach(), channel_dim))

            def store(grad: torch.Tensor) -> None:
                grads[index] = grad.detach()

            output.register_hook(store)

        handles = [m.register_forward_hook(keep) for m in weight_layers(model)]
        try:
            cross_entropy_backward(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        total = 0.0
        for index, (activation, channel_dim) in enumerate(records):
            if index not in grads:
                continue
            product = (activation * grads[index]).movedim(channel_dim, -1)
            per_channel = product.reshape(product.shape[0], -1, product.shape[-1]).sum(dim=1)
            total += float(0.5 * per_channel.pow(2).mean(dim=0).sum())
        return total


@register_proxy
class Synflow(Proxy):
    """Synaptic flow ``sum |theta * dR/dtheta|`` with ``R = 1^T (prod_l |W_l|) 1``: the sum of
    the outputs of the network with all parameters replaced by their absolute values, fed an
    all-ones input (Tanaka et al., NeurIPS 2020, eq. 2; Abdelfattah et al.'s data-free form).

    Float64 (products of many weights overflow float32), BatchNorm in eval mode (fresh running
    statistics make it a near-identity, the "BN off" of the zero-cost code), and the weights'
    signs, dtype and train/eval modes are restored afterwards. Higher = better."""

    name = "synflow"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        modes = [(m, m.training) for m in model.modules()]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        weights = scored_weights(model)
        model.eval()
        model.double()
        with torch.no_grad():
            signs = [torch.sign(p) for p in model.parameters()]
            for parameter in model.parameters():
                parameter.abs_()
        try:
            model.zero_grad(set_to_none=True)
            ones = torch.ones((1, *inputs.x.shape[1:]), dtype=torch.float64)
            with torch.enable_grad():
                torch.sum(model(ones)).backward()
            return float(
                sum((w.detach() * g).abs().sum() for w, g in zip(weights, _grads(weights)))
            )
        finally:
            with torch.no_grad():
                for parameter, sign in zip(model.parameters(), signs):
                    parameter.mul_(sign)
            # A float32 value survives the round trip through float64 exactly.
            if dtype is not None:
                model.to(dtype)
            for module, training in modes:
                module.training = training
            model.zero_grad(set_to_none=True)


@register_proxy
class JacobCov(Proxy):
    """Jacobian covariance (Mellor et al., 2020, "Neural Architecture Search without Training",
    arXiv v1, eq. 2): ``J_n = d(sum_k z_k)/dx_n`` per sample, ``Sigma`` the correlation matrix
    of the ``J_n``, score ``-sum_i [log(lambda_i + k) + 1/(lambda_i + k)]``, ``k = 1e-5``.
    Less correlated input-output Jacobians across samples = higher = better."""

    name = "jacob_cov"

    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        model.train()
        model.zero_grad(set_to_none=True)
        x = inputs.x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            (jacobian,) = torch.autograd.grad(logits.sum(), x)
        return correlation_eigen_score(jacobian)
