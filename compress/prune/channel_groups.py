"""Coupled channel groups of a model, found by Torch-Pruning's DependencyGraph.

A *group* is a set of channels that must be removed together: a conv's output channels, its BN,
the next layer's input channels, every layer tied to them by a residual add, a depthwise conv's
channels, the q/k/v rows and proj columns of one attention head. Torch-Pruning traces the model
(autograd graph of one forward pass) and builds these groups; this module decides which groups
may be pruned, names them, and applies a plan ("keep these units") with Torch-Pruning's surgery.

Groups that are *not* pruned, with the reason recorded in :attr:`ChannelGraph.skipped`:

* channels that reach the model output (the classifier's logits);
* layers matched by ``ignore`` (their output channels stay; their inputs may shrink);
* channels that flow into a layer Torch-Pruning cannot resize (e.g. ``nn.GRU``), or a grouped
  (non-depthwise) convolution or GroupNorm, whose channel groups it would have to keep balanced;
* widths normalised by a LayerNorm (a transformer's residual stream) unless ``prune_embedding``:
  removing even an all-zero channel changes LayerNorm's mean and variance, and the group couples
  every block and the position embedding.

Attention groups (Linear layers inside a module that has a head-count attribute such as
``num_heads`` or ``num_attention_heads``) are pruned in whole heads: unit ``h`` is rows
``h*head_dim .. (h+1)*head_dim`` of q, k and v and the same columns of the output projection,
which assumes the usual head-major ``reshape(..., num_heads, head_dim)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch_pruning as tp

CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head")
# Attributes that hold num_heads * head_dim and must follow the head count.
INNER_DIM_ATTRS = ("all_head_size", "inner_dim")


class StructuredPruningError(ValueError):
    """A model, plan or target that structured pruning cannot handle; the message says why."""


@dataclass
class ChannelGroup:
    """Channels (or attention heads) that are kept or removed together.

    ``size`` counts units: channels, or heads for ``kind == "heads"`` (``unit_width`` channels
    each). ``root``/``root_fn`` is the layer and Torch-Pruning function the group is rooted at;
    ``tp_group`` holds every coupled layer with all indices (what importance scores read).
    """

    name: str
    kind: Literal["channels", "heads"]
    size: int
    unit_width: int
    out_layers: list[str]
    in_layers: list[str]
    root: nn.Module
    root_fn: Callable[..., Any]
    tp_group: Any
    attention: str | None = None  # the module whose head count changes (heads only)

    @property
    def channels(self) -> int:
        return self.size * self.unit_width

    def units_to_channels(self, units: torch.Tensor) -> list[int]:
        """Root channel indices of the given unit indices (heads expand to their rows)."""
        units = torch.as_tensor(units, dtype=torch.long).flatten()
        if self.unit_width == 1:
            return sorted(units.tolist())
        offsets = torch.arange(self.unit_width)
        return sorted((units[:, None] * self.unit_width + offsets).flatten().tolist())


@dataclass
class ChannelGraph:
    """The model's prunable groups, the dependency graph behind them and what was left out."""

    model: nn.Module
    example_input: Any
    dependency_graph: Any
    groups: list[ChannelGroup]
    skipped: dict[str, str] = field(default_factory=dict)  # group/layer name -> reason
    layer_names: dict[nn.Module, str] = field(default_factory=dict)

    def group(self, name: str) -> ChannelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no prunable group {name!r}; groups: {[g.name for g in self.groups]}")


def find_channel_groups(
    model: nn.Module,
    example_input: Any,
    *,
    ignore: str | None = None,
    prune_heads: bool = True,
    prune_embedding: bool = False,
) -> ChannelGraph:
    """Trace ``model`` on ``example_input`` and list its prunable channel groups.

    Raises:
        StructuredPruningError: NaN/inf weights, a model Torch-Pruning cannot trace, or an
            ``ignore`` regex that matches no Conv/Linear layer.
    """
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    check_finite(model)
    layers = [name for name, m in model.named_modules() if isinstance(m, CONV_LINEAR)]
    if ignore is not None and not any(re.search(ignore, name) for name in layers):
        raise StructuredPruningError(
            f"ignore={ignore!r} matches no Conv/Linear layer; layers: {', '.join(layers) or 'none'}"
        )
    graph = _trace(model, example_input)
    param_names = {p: n for n, p in model.named_parameters()}
    # Layers with weights that torch-pruning has no pruner for (it files them as element-wise).
    unsupported = {
        name: type(m).__name__
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
        and m is not model
        and tp.ops.module2type(m) == tp.ops.OPTYPE.ELEMENTWISE
    }
    outputs = _output_modules(model, example_input)
    result = ChannelGraph(model, example_input, graph, [], {}, names)
    for root, tp_group in _all_groups(graph, names, unsupported, result.skipped):
        group, reason = _classify(
            tp_group,
            graph,
            names,
            modules,
            param_names,
            unsupported,
            outputs,
            ignore,
            prune_heads,
            prune_embedding,
        )
        if group is not None:
            result.groups.append(group)
        else:
            result.skipped[root] = reason
    for name, kind in unsupported.items():
        if not any(name == owner or name.startswith(owner + ".") for owner in result.skipped):
            result.skipped.setdefault(
                name,
                f"layer {name!r} ({kind}) is not supported by "
                "torch-pruning's dependency graph; its channels "
                "stay as they are",
            )
    return result


def _all_groups(
    graph: Any, names: dict[nn.Module, str], unsupported: dict[str, str], skipped: dict[str, str]
) -> Iterator[tuple[str, Any]]:
    """``DependencyGraph.get_all_groups`` with a failure per root layer recorded, not raised."""
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if not isinstance(module, CONV_LINEAR) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        name = names.get(module, "?")
        try:
            channels = pruner.get_out_channels(module)
            tp_group = graph.get_pruning_group(
                module, pruner.prune_out_channels, list(range(channels))
            )
        except Exception as exc:  # torch-pruning's index mapping fails on graphs it misreads
            hint = "; ".join(f"layer {n!r} ({k}) is not supported" for n, k in unsupported.items())
            skipped[name] = (
                f"torch-pruning could not resolve how its channels are coupled "
                f"({type(exc).__name__}: {str(exc)[:120]})" + (f"; {hint}" if hint else "")
            )
            visited.add(module)
            continue
        for dep, _ in tp_group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
        yield name, tp_group


def check_finite(model: nn.Module) -> None:
    """Raise if any parameter holds NaN or inf (magnitudes could not be ranked)."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter.detach()).all():
            raise StructuredPruningError(
                f"parameter {name!r} has NaN or inf values; cannot rank "
                "channel magnitudes (was training unstable?)"
            )


def _trace(model: nn.Module, example_input: Any) -> Any:
    modes = [(module, module.training) for module in model.modules()]
    try:
        with torch.enable_grad():  # the graph is read from autograd's grad_fn chain
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False
            )
    except Exception as exc:  # torch-pruning raises assorted types from deep inside tracing
        raise StructuredPruningError(
            f"torch-pruning could not trace {type(model).__name__} to build its dependency "
            f"graph ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            "; the model must run on the example input and return tensors"
        ) from exc
    finally:
        for module, training in modes:  # tracing switches to eval mode and leaves it there
            module.training = training


@torch.no_grad()
def _output_modules(model: nn.Module, example_input: Any) -> set[nn.Module]:
    """Modules whose output tensor is (one of) the model's outputs: their channels are the API."""
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (module, output)  # keep the tensor alive: ids stay unique

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        out = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    found = set()
    for tensor in _flatten_tensors(out):
        if id(tensor) in produced:
            found.add(produced[id(tensor)][0])
    return found


def _flatten_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten_tensors(v)]
    return []


def _classify(
    tp_group: Any,
    graph: Any,
    names: dict[nn.Module, str],
    modules: dict[str, nn.Module],
    param_names: dict[nn.Parameter, str],
    unsupported: dict[str, str],
    outputs: set[nn.Module],
    ignore: str | None,
    prune_heads: bool,
    prune_embedding: bool,
) -> tuple[ChannelGroup | None, str]:
    """A ChannelGroup for a torch-pruning group, or None and why it is not pruned."""
    root, root_fn = tp_group[0].dep.target.module, tp_group[0].dep.handler
    out_layers: list[str] = []
    in_layers: list[str] = []
    producers: list[str] = []  # conv/linear layers whose output channels are the group
    for dep, _ in tp_group:
        target = dep.target.module
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(target, tp.ops._OutputOp) or (is_out and target in outputs):
            return None, "its channels are the model's output"
        if isinstance(target, nn.Parameter):
            owner = param_names.get(target, "").rpartition(".")[0]
            if owner in unsupported:
                return None, (
                    f"its channels flow into layer {owner!r} ({unsupported[owner]}), "
                    "which torch-pruning cannot resize"
                )
            continue
        if not isinstance(target, nn.Module) or target not in names:
            continue  # torch-pruning's placeholder ops (adds, reshapes, activations)
        name = names[target]
        if (
            isinstance(target, nn.modules.conv._ConvNd)
            and target.groups > 1
            and not (target.groups == target.in_channels == target.out_channels)
        ):
            return None, f"layer {name!r} is a grouped convolution (groups={target.groups})"
        if isinstance(target, nn.GroupNorm):
            return None, f"layer {name!r} is a GroupNorm (channel groups must stay balanced)"
        if isinstance(target, nn.LayerNorm) and not prune_embedding:
            return None, (
                f"its width is normalised by LayerNorm {name!r} (a transformer's "
                "residual width; set prune_embedding to prune it)"
            )
        (out_layers if is_out else in_layers).append(name)
        if is_out and isinstance(target, CONV_LINEAR):
            producers.append(name)
    root_name = names.get(root, "?")
    if ignore is not None:
        hit = next((n for n in out_layers if re.search(ignore, n)), None)
        if hit is not None:
            return None, f"layer {hit!r} matches ignore={ignore!r}"
    size = len(tp_group[0].idxs)
    # Heads: every layer producing the channels is a Linear of one module with a head count
    # (q, k, v). A residual stream also holds attention output projections, but mixed with
    # other producers from several blocks: that is a channel group.
    parents = {name.rpartition(".")[0] for name in producers}
    attention_name = parents.pop() if len(parents) == 1 else None
    attention = modules.get(attention_name) if attention_name is not None else None
    if attention is not None and _head_count(attention) is not None and len(producers) == 1:
        # One Linear makes q, k and v at once (GPT-2's c_attn, split after the matmul): the
        # dependency graph cannot follow its channels through the split to the heads.
        return None, (f"attention {attention_name!r} computes q, k and v in one fused layer "
                      f"{producers[0]!r}; its heads are not pruned (FFN channels are)")
    if attention is None or _head_count(attention) is None or len(producers) < 2:
        if size < 2:
            return None, "a single channel"
        return ChannelGroup(
            root_name, "channels", size, 1, out_layers, in_layers, root, root_fn, tp_group
        ), ""
    if not prune_heads:
        return None, "attention heads (prune_heads is off)"
    heads = _head_count(attention)
    if heads is None or heads < 2 or size % heads:
        return (
            None,
            f"attention {attention_name!r}: {size} channels do not split into {heads} heads",
        )
    return ChannelGroup(
        attention_name,
        "heads",
        heads,
        size // heads,
        out_layers,
        in_layers,
        root,
        root_fn,
        tp_group,
        attention=attention_name,
    ), ""


def _head_count(module: nn.Module) -> int | None:
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


