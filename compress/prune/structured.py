"""Structured pruning that physically removes channels and attention heads.

The pieces, each usable on its own:

* :mod:`slimline.compress.prune.channel_groups` - coupled groups from Torch-Pruning's DependencyGraph
  (residual adds, BN, depthwise convs, concat, the q/k/v/proj of a head) and the surgery;
* :mod:`slimline.compress.prune.channel_importance` - ``importance(group) -> scores`` (L1/L2 magnitude);
* :mod:`slimline.compress.prune.channel_allocation` - kept units per group: ``uniform``, ``global``
  ranking, or ``dp`` (:func:`slimline.compress.prune.dp.allocate_dp`) under a channel, FLOPs or
  latency budget (:mod:`slimline.compress.prune.layer_latency`: a per-layer onnxruntime table);
* :mod:`slimline.compress.prune.flops` - FLOPs and parameter counts.

:func:`prune_channels` wires them::

    result = prune_channels(model, torch.randn(1, 1, 8, 8), ratio=0.5, target="flops",
                            allocation="dp", round_to=8)
    print(result.flops_ratio, result.layer_channels["layer1.0.conv1"])

The model shrinks in place and stays an ordinary ``nn.Module`` (same classes, smaller tensors,
updated ``out_channels``/``num_heads`` attributes), so it exports to ONNX at the new shapes and
:mod:`slimline.structure` records it for save/load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from slimline.compress.prune.channel_allocation import (
    Allocation,
    Target,
    allocate,
    group_levels,
)
from slimline.compress.prune.channel_cost import build_cost_model
from slimline.compress.prune.channel_distortion import output_distortion_table
from slimline.compress.prune.channel_groups import (
    CONV_LINEAR,
    ChannelGraph,
    ChannelGroup,
    StructuredPruningError,
    find_channel_groups,
)
from slimline.compress.prune.channel_importance import (
    ChannelImportance,
    ChannelMagnitudeImportance,
    unit_scores,
)
from slimline.compress.prune.channel_surgery import prune_group
from slimline.compress.prune.flops import count_flops

if TYPE_CHECKING:
    from slimline.export.layer_lut import LayerLatencyTable

DPDistortion = Literal["output", "magnitude"]

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "ChannelImportance",
    "ChannelPruningResult",
    "ChannelMagnitudeImportance",
    "StructuredPruningError",
    "find_channel_groups",
    "layer_widths",
    "prune_channels",
]


@dataclass
class ChannelPruningResult:
    """What :func:`prune_channels` did; ``to_dict()`` is JSON-ready."""

    ratio: float
    target: str
    allocation: str
    round_to: int
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    channels_before: int  # channels of the prunable groups (a head counts head_dim)
    channels_after: int
    # group name -> {"kind", "layers", "unit_width", "before", "after"} (units: channels/heads)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Conv/Linear layer -> [output channels before, after]
    layer_channels: dict[str, list[int]] = field(default_factory=dict)
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> [before, after]
    skipped: dict[str, str] = field(default_factory=dict)  # group/layer -> why it was not pruned
    # target="latency": the table's predicted latency (ms) before and after
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None

    @property
    def flops_ratio(self) -> float:
        """FLOPs after / before (the physical speed-up limit is its inverse)."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def channels_removed(self) -> float:
        """Fraction of the prunable groups' channels removed."""
        return 1.0 - self.channels_after / self.channels_before if self.channels_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "flops_ratio": self.flops_ratio,
            "params_ratio": self.params_ratio,
            "channels_removed": self.channels_removed,
        }


def prune_channels(
    model: nn.Module,
    example_input: Any,
    ratio: float = 0.3,
    *,
    target: Target = "channels",
    importance: ChannelImportance | None = None,
    allocation: Allocation = "uniform",
    round_to: int = 1,
    ignore: str | None = None,
    max_group_ratio: float = 0.9,
    prune_heads: bool = True,
    prune_embedding: bool = False,
    dp_distortion: DPDistortion = "output",
    dp_samples: int = 32,
    masks: dict[str, torch.Tensor] | None = None,
    latency_table: LayerLatencyTable | None = None,
    dp_inputs: torch.Tensor | None = None,
) -> ChannelPruningResult:
    """Remove ``ratio`` of the channels (``target="channels"``), FLOPs (``"flops"``) or predicted
    latency (``"latency"``, from ``latency_table``), in place.

    Args:
        model: pruned in place; on an error it may be left partly pruned, so pass a copy.
        example_input: one input batch (batch size 1 gives per-sample FLOPs).
        ratio: fraction to remove, in [0, 1).
        importance: unit scores, default :class:`ChannelMagnitudeImportance` (L1 path magnitude).
        allocation: ``uniform`` (same fraction per group), ``global`` (rank all units
            together) or ``dp`` (least distortion under the budget, see ``dp_distortion``).
        round_to: kept channels of every group are a multiple of this (or the full width).
        ignore: regex on layer names whose output channels must stay (e.g. ``"^fc$"``).
        max_group_ratio: no group loses more than this fraction of its units.
        prune_heads: prune attention in whole heads (else leave attention groups alone).
        prune_embedding: also prune LayerNorm-normalised (transformer residual) widths.
        dp_distortion: what ``dp`` minimises: ``output`` - the model's output change when a
            group alone is pruned, measured on ``dp_samples`` N(0, 1) inputs (data-free, Xu et
            al.'s additive distortion) - or ``magnitude``, the summed scores of removed units.
        masks: keep-masks (parameter name -> bool tensor) sliced along with their weights.
        dp_inputs: the batch ``dp_distortion="output"`` measures on (default: ``dp_samples``
            synthetic inputs like ``example_input``; pass valid token ids for token models).
        latency_table: per-layer latency grids of this model
            (:func:`slimline.compress.prune.layer_latency.build_layer_latency_table`); required for and
            only used by ``target="latency"``, whose budget is ``(1 - ratio)`` times the table's
            prediction for the unpruned model (overhead counted once).

    Raises:
        StructuredPruningError: bad ratio, nothing prunable, an unreachable budget, NaN/inf
            weights, a graph Torch-Pruning cannot trace or prune (naming the layer).
    """
    if not 0.0 <= ratio < 1.0:
        raise StructuredPruningError(f"ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise StructuredPruningError(f"round_to must be at least 1, got {round_to}")
    for key, value, allowed in (
        ("target", target, ("channels", "flops", "latency")),
        ("allocation", allocation, ("uniform", "global", "dp")),
        ("dp_distortion", dp_distortion, ("output", "magnitude")),
    ):
        if value not in allowed:
            raise StructuredPruningError(f"{key} must be one of {allowed}, got {value!r}")
    if target == "latency" and latency_table is None:
        raise StructuredPruningError(
            "target='latency' needs latency_table (slimline.compress.prune.layer_latency."
            "build_layer_latency_table, or LayerLatencyTable.load)"
        )
    importance = importance or ChannelMagnitudeImportance(p=1)
    before = count_flops(model, example_input)
    widths_before = layer_widths(model)
    graph = find_channel_groups(
        model,
        example_input,
        ignore=ignore,
        prune_heads=prune_heads,
        prune_embedding=prune_embedding,
    )
    if not graph.groups:
        reasons = "; ".join(f"{name}: {why}" for name, why in graph.skipped.items()) or "none"
        raise StructuredPruningError(
            f"{type(model).__name__} has no prunable channel group (not pruned: {reasons})"
        )
    try:
        scores = [unit_scores(group, importance) for group in graph.groups]
    except ValueError as exc:
        raise StructuredPruningError(str(exc)) from None
    cost = build_cost_model(graph, before)
    latency_before = None
    if target == "latency":
        # Imported here: the latency path pulls in onnx/onnxruntime, the others need neither.
        from slimline.compress.prune.layer_latency import attach_latency

        attach_latency(cost, graph, latency_table)
        latency_before = cost.latency([g.size for g in graph.groups])
    table = None
    if allocation == "dp" and dp_distortion == "output":
        levels = [group_levels(g, round_to, max_group_ratio) for g in graph.groups]
        inputs = dp_inputs if dp_inputs is not None else _noise_like(example_input, dp_samples)
        table = output_distortion_table(graph, scores, levels, inputs)
    kept = allocate(
        graph.groups,
        scores,
        cost,
        ratio=ratio,
        target=target,
        method=allocation,
        round_to=round_to,
        max_group_ratio=max_group_ratio,
        distortion=table,
    )
    groups_record, heads = {}, {}
    for group, score, keep in zip(graph.groups, scores, kept):
        size, remove = group.size, torch.argsort(score, stable=True)[: group.size - keep]
        try:
            prune_group(graph, group, remove, masks)
        except StructuredPruningError:
            raise
        except Exception as exc:  # torch-pruning surgery failed: say where
            raise StructuredPruningError(
                f"torch-pruning failed to prune group {group.name!r} (layers "
                f"{', '.join(group.out_layers + group.in_layers)}): {type(exc).__name__}: "
                f"{exc}"
            ) from exc
        groups_record[group.name] = {
            "kind": group.kind,
            "unit_width": group.unit_width,
            "layers": group.out_layers,
            "before": size,
            "after": keep,
        }
        if group.kind == "heads":
            heads[group.name] = [size, keep]
    latency_after = cost.latency(kept) if latency_before is not None else None
    _check_runs(model, example_input)
    after = count_flops(model, example_input)
    widths_after = layer_widths(model)
    return ChannelPruningResult(
        ratio=ratio,
        target=target,
        allocation=allocation,
        round_to=round_to,
        flops_before=before.total,
        flops_after=after.total,
        params_before=before.params,
        params_after=after.params,
        channels_before=sum(v["before"] * v["unit_width"] for v in groups_record.values()),
        channels_after=sum(v["after"] * v["unit_width"] for v in groups_record.values()),
        groups=groups_record,
        layer_channels={n: [widths_before[n], widths_after.get(n, 0)] for n in widths_before},
        heads=heads,
        skipped=dict(graph.skipped),
        latency_before_ms=latency_before,
        latency_after_ms=latency_after,
    )


def _noise_like(example_input: Any, samples: int) -> Any:
    """N(0, 1) float inputs shaped like the example (integer inputs, e.g. token ids, are
    resampled from the example's own values)."""
    generator = torch.Generator().manual_seed(0)
    if not isinstance(example_input, torch.Tensor):
        raise StructuredPruningError(
            "dp_distortion='output' needs a tensor example input; use dp_distortion='magnitude'"
        )
    shape = (samples, *example_input.shape[1:])
    if example_input.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=example_input.dtype)
    flat = example_input.flatten()
    pick = torch.randint(0, flat.numel(), shape, generator=generator)
    return flat[pick]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every Conv/Linear layer."""
    return {
        name: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        for name, m in model.named_modules()
        if isinstance(m, CONV_LINEAR)
    }


@torch.no_grad()
def _check_runs(model: nn.Module, example_input: Any) -> None:
    """Run the pruned model once; a failure names the op and the layer it happened in."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    finished: list[str] = []

    class _LastOp(TorchDispatchMode):
        op = ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _LastOp.op = str(func.overloadpacket.__name__)  # recorded before it runs
            return func(*args, **(kwargs or {}))

    def enter(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        finished.append(stack.pop())

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with _LastOp():
            model(example_input)
    except Exception as exc:
        if stack:
            where = f"layer {stack[-1]!r} ({type(model.get_submodule(stack[-1])).__name__})"
        else:
            after = f" after layer {finished[-1]!r}" if finished else ""
            where = f"{type(model).__name__}.forward(){after}"
        raise StructuredPruningError(
            f"the pruned model fails at op aten::{_LastOp.op} in {where}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}. Torch-Pruning's dependency graph treats that op "
            "as element-wise and missed how it couples channels; keep the layers that feed it "
            "with ignore="
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
