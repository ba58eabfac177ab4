"""Activation smoothing before int8 quantization (SmoothQuant; Xiao et al., ICML 2023).

Transformer activations carry a few channels far larger than the rest (BERT's LayerNorm outputs
reach 28 where most values stay within ±2; GELU outputs reach 25 where 99.99 % stay under 4). One
per-tensor 8-bit scale sized for those channels leaves the others a handful of levels. SmoothQuant
divides input channel ``j`` of a Linear by ``s_j`` and multiplies column ``j`` of its weight by
``s_j``, an identity in float (eq. 3: ``Y = (X diag(s)^-1) (diag(s) W)``), with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)                           (eq. 4)

moving range from the activation (one scale per tensor) into the weight (one scale per output
channel, where a grown column shares each row's scale with every other column).

The paper uses one ``alpha`` per model. :func:`choose_smoothing` also offers ``"auto"``: each
group of Linears reading one tensor takes the ``alpha`` from a grid, or no smoothing at all,
whichever gives the lowest output error with both operands fake-quantized on the grids they will
run on, two-fold cross-validated over the calibration rows (fitted on one half, measured on the
other: on its own rows a large alpha always looks best, on unseen rows its flattened channels
clip). In the int8 file the division is a ``Mul`` by ``1/s`` in front of the layer's input
``QuantizeLinear`` (the state's ``smoothing``; see :mod:`slimline.compress.quant.state`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from slimline.compress.quant.spec import QuantSpec

__all__ = ["AUTO_ALPHAS", "apply_smoothing", "choose_smoothing", "smoothquant_scales"]

AUTO_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_EPS = 1e-5
_MAX_ROWS = 4096  # input rows per layer kept for the search: plenty for a max and an MSE
_MIN_ROWS = 16  # fewer calibration rows than this: "auto" smooths nothing


def smoothquant_scales(
    activation_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Per input channel divisors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (Xiao et al.,
    2023, eq. 4). ``activation_absmax`` is over calibration rows, ``weight_absmax`` over the
    weight's output rows (column maxima). Channels that are always zero get ``s = 1``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    a = activation_absmax.float().clamp(min=_EPS)
    w = weight_absmax.float().clamp(min=_EPS)
    scales = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_EPS)
    return torch.where(activation_absmax > 0, scales, torch.ones_like(scales))


def smoothing_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    weight_grid: Callable[[torch.Tensor], QuantSpec],
    activation_grid: Callable[[float, float], QuantSpec],
    *,
    ranges_from: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
) -> float:
    """Mean squared error of ``x @ weight.T`` when ``x / s`` and ``weight * s`` are fake-quantized
    (``weight_grid``: per-channel spec of a weight; ``activation_grid``: spec from a min/max).
    The activation grid covers ``ranges_from / s`` (default: ``x`` itself); rows outside it
    are clipped, as unseen inputs are at run time. ``reference``: ``x @ weight.T`` if the
    caller already has it (it does not depend on ``s``)."""
    if reference is None:
        reference = x @ weight.T
    fitted = x if ranges_from is None else ranges_from
    if scales is not None:
        x, fitted, weight = x / scales, fitted / scales, weight * scales
    xq = activation_grid(float(fitted.min()), float(fitted.max())).fake_quant(x)
    wq = weight_grid(weight).fake_quant(weight)
    return float((xq @ wq.T - reference).pow(2).mean())


@torch.no_grad()
def choose_smoothing(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    calibration: torch.Tensor,
    *,
    alpha: float | str,
    weight_grid: Callable[[str, torch.Tensor], QuantSpec],
    activation_grid: Callable[[float, float], QuantSpec],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Divisors ``s`` per Linear name for the layers that get smoothed.

    Linears that read the same tensor (an attention block's query, key and value) share one
    ``s`` built from all their weights' column maxima, as in the paper: then the exported graph
    divides and quantizes that tensor once for all of them. ``alpha`` a number: every group gets
    eq. 4 with it. ``"auto"``: each group's ``alpha`` from :data:`AUTO_ALPHAS` or none at all,
    whichever gives the lowest cross-validated :func:`smoothing_error` summed over the group
    (calibration inputs: at most 4,096 rows, a fixed subset). ``weight_grid(name, w)`` and
    ``activation_grid(min, max)`` are the quantizer's own grids.
    """
    chosen: dict[str, torch.Tensor] = {}
    for names, x in _group_inputs(model, layers, calibration, batch_size):
        weights = {name: layers[name].weight.detach().float() for name in names}
        weight_max = torch.stack([w.abs().amax(dim=0) for w in weights.values()]).amax(dim=0)
        if alpha == "auto":
            best = _best_alpha(x, weights, weight_max, weight_grid, activation_grid)
        else:
            best = float(alpha)
        if best is not None:
            scales = smoothquant_scales(x.abs().amax(dim=0), weight_max, best)
            chosen.update({name: scales for name in names})
    return chosen


def _best_alpha(
    x: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    weight_max: torch.Tensor,
    weight_grid: Callable[[str, torch.Tensor], QuantSpec],
    activation_grid: Callable[[float, float], QuantSpec],
) -> float | None:
    """The alpha (or ``None``: no smoothing) with the lowest two-fold cross-validated error:
    ``s`` and the activation range from one half of the rows, the error on the other. On the
    rows it was fitted to, a large alpha always looks best; on unseen rows the flattened
    channels clip (the calibration maxima were too tight), which this counts. The halves split
    rows (a sequence model's tokens), not samples, so tokens of one sentence can fall in both:
    the check is of unseen values more than of unseen inputs."""
    if len(x) < _MIN_ROWS:
        return None  # too few rows to tell an alpha from noise: leave the layer as it is
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    halves = (x[order[: len(x) // 2]], x[order[len(x) // 2:]])
    # per fold, what does not depend on alpha: the fit half's channel maxima and the float
    # outputs on the test half
    folds = [(fit, test, fit.abs().amax(dim=0), {n: test @ w.T for n, w in weights.items()})
             for fit, test in ((halves[0], halves[1]), (halves[1], halves[0]))]

    def error(candidate: float | None) -> float:
        total = 0.0
        for fit, test, fit_max, references in folds:
            scales = (None if candidate is None else
                      smoothquant_scales(fit_max, weight_max, candidate))
            total += sum(smoothing_error(test, w, scales, lambda v, n=name: weight_grid(n, v),
                                         activation_grid, ranges_from=fit,
                                         reference=references[name])
                         for name, w in weights.items())
        return total

    errors = {candidate: error(candidate) for candidate in (None, *AUTO_ALPHAS)}
    return min(errors, key=lambda c: errors[c])


@torch.no_grad()
def apply_smoothing(model: nn.Module, scales: Mapping[str, torch.Tensor]) -> None:
    """Multiply weight column ``j`` of each named Linear by ``s_j`` (in place). The model is
    only equivalent again once its input is divided by ``s`` (the quantization state's hooks)."""
    modules = dict(model.named_modules())
    for name, s in scales.items():
        modules[name].weight.mul_(s.to(modules[name].weight.dtype))


def _group_inputs(
    model: nn.Module, layers: Mapping[str, nn.Linear], calibration: torch.Tensor, batch_size: int
) -> list[tuple[list[str], torch.Tensor]]:
    """Layers grouped by the tensor they read (the same tensor object in the first batch),
    each group with its calibration inputs as ``[rows, in_features]`` (a fixed random
    subset of at most :data:`_MAX_ROWS` rows)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    first_input: dict[str, torch.Tensor] = {}
    group_of: dict[str, int] = {}
    generator = torch.Generator().manual_seed(0)
    batches = -(-len(calibration) // batch_size)
    per_batch = -(-_MAX_ROWS // batches)  # subsample as we go: a long calibration stays small

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                return
            if not group_of:  # first batch: held until it ends, so no tensor reuses its memory
                first_input.setdefault(name, x)
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            if len(rows) > per_batch:
                rows = rows[torch.randperm(len(rows), generator=generator)[:per_batch]]
            seen[name].append(rows.clone())  # a view would follow later in-place updates
        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:
        for start in range(0, len(calibration), batch_size):
            model(calibration[start:start + batch_size])
            if not group_of:
                group_of.update({name: id(x) for name, x in first_input.items()})
                first_input.clear()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name in layers:
        if seen[name]:
            groups.setdefault(group_of.get(name, -len(groups) - 1), []).append(name)
    return [(names, torch.cat(seen[names[0]])) for names in groups.values()]
