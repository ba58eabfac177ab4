"""Fold BatchNorm into the convolution before it, so quantization sees the deployed weights.

An exported ONNX graph has no BatchNorm after a conv (exporters and runtimes fold it), so the
weights that get int8 scales are the folded ones. Folding in PyTorch first means the scales we
choose — and export — are exactly the ones the PyTorch fake-quant model uses. The folded BN is
replaced by ``nn.Identity`` (which :mod:`slimline.structure` records, so an artifact reloads).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["conv_bn_pairs", "fold_batchnorm", "fold_conv_bn_weights"]

log = logging.getLogger(__name__)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_conv_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of ``bn(conv(x))`` as one conv (Jacob et al., 2018, sec. 3.2)::

        s  = gamma / sqrt(var + eps)          (per output channel)
        W' = W * s                            (scaling output channel c of W by s_c)
        b' = (b - mean) * s + beta

    Computed in float64 and returned in ``weight``'s dtype. Missing ``bias``/``gamma``/``beta``
    (conv without bias, BN without affine) count as 0, 1 and 0.
    """
    dtype = weight.dtype
    mean, var = mean.double(), var.double()
    gamma = gamma.double() if gamma is not None else torch.ones_like(mean)
    beta = beta.double() if beta is not None else torch.zeros_like(mean)
    bias = bias.double() if bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + eps)
    folded_weight = weight.double() * s.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_bias = (bias - mean) * s + beta
    return folded_weight.to(dtype), folded_bias.to(dtype)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BN's only input is the conv's output and the
    conv's output goes nowhere else: exactly the pairs that can be folded.

    Found on the torch.fx graph; a model fx cannot trace falls back to adjacent children of
    ``nn.Sequential`` containers (which are connected by construction).
    """
    modules = dict(model.named_modules())
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        log.info(
            "fx cannot trace %s (%s); folding only Sequential conv->BN pairs",
            type(model).__name__,
            exc,
        )
        return _sequential_pairs(model)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _CONVS):
            continue
        users = list(node.users)
        if len(users) != 1:
            continue
        user = users[0]
        if (
            user.op == "call_module"
            and isinstance(modules.get(user.target), _NORMS)
            and user.args[:1] == (node,)
        ):
            pairs.append((str(node.target), str(user.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, first), (b, second) in zip(children, children[1:]):
            if isinstance(first, _CONVS) and isinstance(second, _NORMS):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm (see :func:`conv_bn_pairs`) into its conv, in place.

    Uses the BN's running statistics (its eval-mode behaviour), gives a bias-less conv a bias,
    and replaces the BN by ``nn.Identity``. Returns the folded (conv, bn) names. A BN without
    running statistics or with a channel count that does not match is left alone.
    """
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if (
            bn.running_mean is None
            or bn.running_var is None
            or (bn.num_features != conv.out_channels)
        ):
            log.info(
                "not folding %s into %s: no running statistics or channel mismatch",
                bn_name,
                conv_name,
            )
            continue
        weight, bias = fold_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        conv.weight.copy_(weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(bias)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        folded.append((conv_name, bn_name))
    return folded
