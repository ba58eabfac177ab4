"""Output distortion of pruned models: per-layer rate-distortion curves and the additivity check.

Xu et al. (ICCV 2023) define the distortion of a pruned network as the squared error of its
outputs against the unpruned network's on fixed inputs, and observe that pruning several
layers distorts the output by roughly the *sum* of what each layer does alone (additivity).
:func:`distortion_curves` measures ``delta_l(phi)`` for every layer ``l`` and level ``phi``
(fraction of the layer's weights removed by magnitude) with everything else dense, which is what
the DP in :mod:`slimline.compress.prune.dp` consumes; :func:`additivity` checks that assumption.

Efficiency: no autograd; one forward per distinct (layer, pruned count) on one fixed batch; and
when the model traces with ``torch.fx``, only the part of the graph downstream of the pruned layer
is recomputed (everything upstream, including skip branches that bypass the layer, is cached from
one reference pass).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

Reduction = str  # "mean" | "max"


def output_distortion(
    output: torch.Tensor, reference: torch.Tensor, reduction: Reduction = "mean"
) -> float:
    """Squared output error vs the dense model (Xu et al.'s output distortion).

    ``mean``: mean squared error over all samples and outputs; ``max``: the worst sample's mean
    squared error (a worst-case variant, more sensitive to outliers).
    """
    error = (output.double() - reference.double()).pow(2).reshape(output.shape[0], -1).mean(1)
    if reduction == "mean":
        return float(error.mean())
    if reduction == "max":
        return float(error.max())
    raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")


def pruned_count(numel: int, level: float, already_zero: int = 0) -> int:
    """Weights a layer loses at level ``level``: ``floor(level * numel)``, never fewer than the
    weights already masked (masks compose). The 1e-9 guards grids like 0.29 * 100 = 28.999..."""
    return max(int(math.floor(level * numel + 1e-9)), already_zero)


def magnitude_order(weight: torch.Tensor) -> torch.Tensor:
    """Flat indices from smallest to largest |w|; ties by position (as ``prune.magnitude``)."""
    return torch.argsort(weight.detach().abs().flatten(), stable=True)


@dataclass
class DistortionCurves:
    """``distortion[l, k]``: output distortion with only layer ``names[l]`` pruned at
    ``levels[k]``; ``kept[l, k]``: how many of its ``numel[l]`` weights it then keeps."""

    names: list[str]
    levels: np.ndarray  # (K,) fraction of each layer's weights removed
    distortion: np.ndarray  # (L, K) float64
    kept: np.ndarray  # (L, K) int64
    numel: np.ndarray  # (L,) int64

    def counts(self, level_index: Sequence[int]) -> dict[str, int]:
        """Pruned weights per layer for one level index per layer."""
        return {
            name: int(self.numel[i] - self.kept[i, k])
            for i, (name, k) in enumerate(zip(self.names, level_index))
        }


class IncrementalForward:
    """Model outputs after changing one layer's weights, recomputing only its downstream graph.

    One reference pass stores every ``torch.fx`` node's value; :meth:`output` re-runs just the
    nodes that depend on the given module. Models that do not trace, or that mutate tensors in
    place (which would corrupt the cache), fall back to a full forward — same results, slower.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor):
        self.model, self.inputs = model, inputs
        self.modules = dict(model.named_modules())
        self.graph: fx.Graph | None = None
        self.cache: dict[fx.Node, object] = {}
        self._downstream: dict[str, list[fx.Node]] = {}
        with torch.no_grad():
            self.reference = model(inputs)
            try:
                graph = fx.symbolic_trace(model).graph
            except Exception:  # any tracing failure only costs speed
                return
            if _mutates_in_place(graph, self.modules):
                return
            self.graph = graph
            self._run(list(graph.nodes), self.cache)
            if not torch.equal(self.cache[self._output_node()], self.reference):
                self.graph, self.cache = None, {}  # the trace is not faithful: do full passes

    @property
    def incremental(self) -> bool:
        return self.graph is not None

    @torch.no_grad()
    def output(self, module_name: str) -> torch.Tensor:
        """The model output with current weights, assuming only ``module_name`` changed."""
        if self.graph is None:
            return self.model(self.inputs)
        if module_name not in self._downstream:
            self._downstream[module_name] = self._nodes_downstream_of(module_name)
        env: dict[fx.Node, object] = {}
        self._run(self._downstream[module_name], env, free=True)
        return env.get(self._output_node(), self.reference)  # type: ignore[return-value]

    def _output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def _nodes_downstream_of(self, module_name: str) -> list[fx.Node]:
        weight_prefix = module_name + "."
        seeds = [
            n
            for n in self.graph.nodes
            if (n.op == "call_module" and n.target == module_name)
            or (n.op == "get_attr" and str(n.target).startswith(weight_prefix))
        ]
        reached: set[fx.Node] = set()
        stack = list(seeds)
        while stack:
            node = stack.pop()
            if node not in reached:
                reached.add(node)
                stack.extend(node.users)
        return [n for n in self.graph.nodes if n in reached]  # graph order is topological

    def _run(self, nodes: list[fx.Node], env: dict[fx.Node, object], *, free: bool = False) -> None:
        """Evaluate ``nodes`` in order into ``env``; with ``free``, drop each value after its
        last use (as torch.fx.Interpreter does): holding every intermediate made a partial
        pass slower than a full forward, through allocator and cache pressure."""
        last_use: dict[fx.Node, list[fx.Node]] = {}
        if free:
            position = {node: i for i, node in enumerate(nodes)}
            for node in nodes:
                inside = [u for u in node.users if u in position]
                if inside and node.op != "output":
                    last_use.setdefault(max(inside, key=position.__getitem__), []).append(node)

        def value(node: fx.Node) -> object:
            return env[node] if node in env else self.cache[node]

        for node in nodes:
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            if node.op == "placeholder":
                env[node] = self.inputs
            elif node.op == "get_attr":
                env[node] = _get_attr(self.model, str(node.target))
            elif node.op == "call_module":
                env[node] = self.modules[str(node.target)](*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            elif node.op == "output":
                env[node] = args[0]
            for done in last_use.get(node, ()):
                del env[done]


def _get_attr(model: nn.Module, path: str) -> object:
    value: object = model
    for part in path.split("."):
        value = getattr(value, part)
    return value


_IN_PLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.setitem,
}


def _mutates_in_place(graph: fx.Graph, modules: dict[str, nn.Module]) -> bool:
    """Whether any node may overwrite an input tensor (inplace=True modules, ``x.add_()``...)."""
    for node in graph.nodes:
        if node.op == "call_module" and getattr(modules[str(node.target)], "inplace", False):
            return True
        if node.op == "call_method" and str(node.target).endswith("_"):
            return True
        if node.op == "call_function" and (
            node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace", False)
        ):
            return True
    return False


@torch.no_grad()
def distortion_curves(
    model: nn.Module,
    names: Sequence[str],
    inputs: torch.Tensor,
    levels: Sequence[float],
    *,
    reduction: Reduction = "mean",
    base_counts: Mapping[str, int] | None = None,
    measure: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> DistortionCurves:
    """Rate-distortion curve of every layer in ``names`` (Xu et al.'s per-layer distortion).

    For layer ``l`` and level ``phi`` the ``floor(phi * n_l)`` smallest-magnitude weights of
    that layer alone are zeroed and ``output_distortion`` is measured against the unmodified
    model on ``inputs``. Levels that remove no more than the layer's existing zeros cost no
    forward. The model is restored exactly afterwards and runs in eval mode.

    ``base_counts`` (name -> pruned count) measures *conditional* curves instead: every other
    layer in it stays pruned at its count while layer ``l`` sweeps the grid, still against the
    unmodified model. Around an allocation ``a`` this is the expansion
    ``D(a') ~ sum_l D(a with layer l at a'_l)`` + const, which tracks interactions between
    layers far better than additivity around the dense model when ``a`` is already close.
    ``measure`` ((L, K) bool) limits the forwards to those levels; the others read ``+inf``
    (the DP never picks them).
    """
    levels_arr = np.asarray(levels, dtype=np.float64)
    if levels_arr.ndim != 1 or levels_arr.size == 0:
        raise ValueError("levels must be a non-empty 1-D sequence")
    if ((levels_arr < 0) | (levels_arr > 1)).any() or np.any(np.diff(levels_arr) <= 0):
        raise ValueError(f"levels must increase strictly within [0, 1], got {levels_arr.tolist()}")
    parameters = dict(model.named_parameters())
    base = dict(base_counts or {})
    missing = [n for n in [*names, *base] if n not in parameters]
    if missing:
        raise KeyError(f"no parameter named {missing[0]!r}")
    if measure is not None and measure.shape != (len(names), len(levels_arr)):
        raise ValueError(f"measure must have shape {(len(names), len(levels_arr))}")
    touched = list(dict.fromkeys([*names, *base]))
    originals = {n: parameters[n].detach().clone() for n in touched}
    was_training = model.training
    model.eval()
    try:
        reference = model(inputs)
        for name, count in base.items():
            _prune_smallest(parameters[name], originals[name], count)
        forward = IncrementalForward(model, inputs)  # caches the base state
        n_layers, n_levels = len(names), len(levels_arr)
        distortion = np.zeros((n_layers, n_levels))
        kept = np.zeros((n_layers, n_levels), dtype=np.int64)
        numel = np.array([parameters[n].numel() for n in names], dtype=np.int64)
        for i, name in enumerate(names):
            weight, original = parameters[name], originals[name]
            flat = weight.data.view(-1)  # in-place edits reach nn.GRU's flat weight views too
            flat.copy_(original.view(-1))
            order = magnitude_order(original)
            zeros = int((original == 0).sum())
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            # Without a base the layer's own weights reproduce the reference: distortion 0.
            last, measured_at = (0.0, zeros) if not base else (np.nan, -1)
            done = zeros
            for k, level in enumerate(levels_arr):
                count = pruned_count(int(numel[i]), float(level), zeros)
                kept[i, k] = numel[i] - count
                if count != done:  # levels only grow, so zero the next slice of the order
                    flat[order[done:count]] = 0
                    done = count
                if measure is not None and not measure[i, k]:
                    distortion[i, k] = np.inf
                    continue
                if count != measured_at:
                    last = output_distortion(forward.output(module_name), reference, reduction)
                    measured_at = count
                distortion[i, k] = last
            _prune_smallest(weight, original, base.get(name, 0))  # back to the base state
            if progress is not None:
                progress(1)
        return DistortionCurves(list(names), levels_arr, distortion, kept, numel)
    finally:
        for name, original in originals.items():
            parameters[name].data.copy_(original)
        model.train(was_training)


def _prune_smallest(weight: torch.Tensor, original: torch.Tensor, count: int) -> None:
    """Set ``weight`` to ``original`` with its ``count`` smallest-magnitude entries zeroed."""
    weight.data.copy_(original)
    if count > 0:
        weight.data.view(-1)[magnitude_order(original)[:count]] = 0


@torch.no_grad()
def joint_distortion(
    model: nn.Module,
    counts: dict[str, int],
    inputs: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> float:
    """Output distortion with every layer in ``counts`` pruned by magnitude at once (restored)."""
    parameters = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    saved = {name: parameters[name].detach().clone() for name in counts}
    try:
        if reference is None:
            reference = model(inputs)
        for name, count in counts.items():
            parameters[name].data.view(-1)[magnitude_order(saved[name])[:count]] = 0
        return output_distortion(model(inputs), reference, reduction)
    finally:
        for name, original in saved.items():
            parameters[name].data.copy_(original)
        model.train(was_training)


@dataclass
class Additivity:
    """Joint vs summed single-layer distortion over random allocations (Xu et al.'s additivity)."""

    pearson: float
    joint: list[float]
    summed: list[float]

    def as_dict(self) -> dict[str, object]:
        return {"pearson": self.pearson, "joint": self.joint, "summed": self.summed}


def additivity(
    model: nn.Module,
    curves: DistortionCurves,
    inputs: torch.Tensor,
    *,
    samples: int = 32,
    max_level: float = 0.9,
    seed: int = 0,
    reduction: Reduction = "mean",
) -> Additivity:
    """Pearson correlation between the measured joint distortion of random allocations and the
    sum of the single-layer distortions the curves predict for them.

    Each allocation draws one level per layer uniformly from the grid levels ``<= max_level``
    (fully pruned layers would dominate the correlation with outliers). ``nan`` when there are
    fewer than two distinct values to correlate.
    """
    if samples < 2:
        raise ValueError(f"additivity needs at least 2 samples, got {samples}")
    allowed = np.flatnonzero(curves.levels <= max_level + 1e-12)
    if allowed.size == 0:
        raise ValueError(f"no grid level is <= max_level={max_level}")
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        reference = model(inputs)
        model.train(was_training)
    rows = np.arange(len(curves.names))
    joint, summed = [], []
    for _ in range(samples):
        choice = rng.choice(allowed, size=len(curves.names))
        summed.append(float(curves.distortion[rows, choice].sum()))
        joint.append(
            joint_distortion(
                model, curves.counts(choice), inputs, reference=reference, reduction=reduction
            )
        )
    return Additivity(pearson_correlation(np.array(joint), np.array(summed)), joint, summed)


def pearson_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; ``nan`` when either side is constant."""
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")
