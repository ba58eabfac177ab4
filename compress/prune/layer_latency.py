"""Build a model's per-layer latency table and measure whole models (torch side).

:func:`build_layer_latency_table` times every Conv/Linear layer of a model with onnxruntime at
a coarse grid of the (input, output) widths channel pruning can give it, producing an
:class:`slimline.export.layer_lut.LayerLatencyTable` for ``prune_channels(target="latency")``. Each grid
point is a small module exported to ONNX - the layer at those widths, plus the BatchNorm that
follows it (folded into the Conv by the exporter, as in the whole model) and a ReLU (fused into
the Conv by onnxruntime) - fed an input of the layer's spatial size. Timing reuses
:mod:`slimline.export.lut`: the modules go into a blocks folder with the empty overhead model and are
measured by :func:`slimline.export.lut.measure_lut` (fixed threads, interleaved rounds, the fixed
per-run overhead subtracted from every entry and added back once per prediction).

Grid size: ``grid_points`` widths per side (the smallest reachable, the full width and evenly
spaced multiples of ``round_to`` in between), so at most ``grid_points**2`` timings per layer
(a depthwise conv or a side no group prunes needs one axis / one point); everything between is
interpolated bilinearly (:meth:`slimline.export.layer_lut.LayerGrid.lookup`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimline.compress.prune.channel_allocation import group_levels
from slimline.compress.prune.channel_cost import CostModel, build_cost_model
from slimline.compress.prune.channel_groups import (
    CONV_LINEAR,
    ChannelGraph,
    StructuredPruningError,
    find_channel_groups,
)
from slimline.compress.prune.flops import count_flops
from slimline.export.layer_lut import LayerGrid, LayerLatencyTable, LutError, grid_widths
from slimline.export.lut import (
    BlockFile,
    LatencyTable,
    measure_lut,
    write_manifest,
    write_overhead_model,
)
from slimline.export.lut_blocks import export_block

__all__ = [
    "attach_latency",
    "build_layer_latency_table",
    "measure_model_latency",
    "model_layer_widths",
    "predict_model_latency",
]


def attach_latency(cost: CostModel, graph: ChannelGraph, table: LayerLatencyTable) -> None:
    """Let ``cost`` predict latency from ``table``, which must cover every Conv/Linear layer.

    Raises:
        StructuredPruningError: the table lacks a layer (named) or has other full widths, or
            a group is attention heads (the table has no attention matmuls).
    """
    heads = [group.name for group in graph.groups if group.kind == "heads"]
    if heads:
        raise StructuredPruningError(
            f"target='latency' covers Conv/Linear channel groups only, not attention heads "
            f"({', '.join(heads)}); set prune_heads=False"
        )
    full = {
        name: (_in_out(module))
        for name, module in graph.model.named_modules()
        if isinstance(module, CONV_LINEAR)
    }
    try:
        table.check_layers(full)
    except LutError as exc:
        raise StructuredPruningError(str(exc)) from None
    touched = {layer.name for layer in cost.layers}
    cost.latency_table = table
    cost.latency_constant = table.overhead_ms + sum(
        table.lookup(name, cin, cout) for name, (cin, cout) in full.items() if name not in touched
    )


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def model_layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (in, out)}`` channels of every Conv/Linear layer, as the model is now."""
    return {n: _in_out(m) for n, m in model.named_modules() if isinstance(m, CONV_LINEAR)}


def predict_model_latency(table: LayerLatencyTable, model: nn.Module) -> float:
    """The table's prediction (ms) for ``model`` at its current (possibly pruned) widths."""
    return table.predict(model_layer_widths(model))


@torch.no_grad()
def _layer_context(model: nn.Module, example_input: Any) -> dict[str, tuple[list[int], list[str]]]:
    """Per Conv/Linear layer: its input shape, and the BatchNorm that reads its output (if any)."""
    shapes: dict[str, list[int]] = {}
    produced: dict[int, str] = {}
    followers: dict[str, list[str]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CONV_LINEAR):

            def hook(mod, args, output, name=name):
                shapes.setdefault(name, list(args[0].shape))
                produced[id(output)] = name

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):

            def bn_hook(mod, args, output):
                owner = produced.get(id(args[0]))
                if owner is not None:
                    followers[owner] = [type(mod).__name__]

            handles.append(module.register_forward_hook(bn_hook))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return {name: (shape, followers.get(name, [])) for name, shape in shapes.items()}


def _layer_module(layer: nn.Module, cin: int, cout: int, bn: bool) -> tuple[nn.Module, list[str]]:
    """``layer`` rebuilt at ``cin -> cout`` (+ BatchNorm + ReLU for a conv) and what it fuses."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(cin, cout, bias=layer.bias is not None), []
    if getattr(layer, "transposed", False):
        raise StructuredPruningError("target='latency' does not support transposed convolutions")
    depthwise = layer.groups > 1
    conv = type(layer)(
        cin,
        cout,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=cout if depthwise else 1,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )
    parts: list[nn.Module] = [conv]
    if bn:
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(layer.kernel_size)]
        parts.append(norm(cout))
    parts.append(nn.ReLU())
    fused = [type(p).__name__ for p in parts[1:]]
    return nn.Sequential(*parts), fused


def build_layer_latency_table(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
    ignore: str | None = None,
    grid_points: int = 4,
    warmup: int = 5,
    runs: int = 60,
    rounds: int = 10,
    threads: int = 1,
    directory: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> LayerLatencyTable:
    """Time every Conv/Linear layer of ``model`` at a grid of prunable widths (see module doc).

    ``example_input``'s batch size is the table's; ``round_to``/``max_group_ratio``/``ignore``
    should match the pruning call (they decide which widths are reachable; others are clamped).
    ONNX files go to ``directory`` (a temporary folder by default).

    Raises:
        StructuredPruningError: the model cannot be traced, or has a layer that cannot be timed.
    """
    if grid_points < 2:
        raise StructuredPruningError(f"grid_points must be at least 2, got {grid_points}")
    started = time.perf_counter()
    graph = find_channel_groups(model, example_input, ignore=ignore, prune_heads=False)
    cost = build_cost_model(graph, count_flops(model, example_input))
    low = [int(group_levels(g, round_to, max_group_ratio)[0]) for g in graph.groups]
    smallest = cost.layer_widths(low)  # every touched layer at its smallest widths
    context = _layer_context(model, example_input)
    modules = dict(model.named_modules())
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(directory) if directory is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        files, grids = [], {}
        for name, (cin, cout) in model_layer_widths(model).items():
            if name not in context:  # never called in forward: costs nothing, but listed so
                grids[name] = ("unused", cin, cout, [], [cin], [cout], [])  # the table matches
                continue
            shape, followers = context[name]
            layer = modules[name]
            lo_in, lo_out = smallest.get(name, (cin, cout))
            depthwise = isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1
            ins = [cin] if depthwise else grid_widths(lo_in, cin, grid_points, round_to)
            outs = grid_widths(lo_out, cout, grid_points, round_to)
            fused: list[str] = []
            for i in ins:
                for o in outs:
                    width_in = o if depthwise else i
                    module, fused = _layer_module(layer, width_in, o, bool(followers))
                    if isinstance(layer, nn.Linear):  # features last: (..., in)
                        input_shape = (*shape[:-1], width_in)
                    else:  # (batch, channels, *spatial)
                        input_shape = (shape[0], width_in, *shape[2:])
                    file = f"{len(files):04d}.onnx"
                    export_block(module, tuple(input_shape), folder / file)
                    files.append(BlockFile(f"{name}|{i}|{o}", file, tuple(input_shape)))
            kind = (
                "linear" if isinstance(layer, nn.Linear) else "depthwise" if depthwise else "conv"
            )
            grids[name] = (kind, cin, cout, shape, ins, outs, fused)
            if progress is not None:
                progress(f"exported {name}: {len(ins)}x{len(outs)} widths")
        overhead = write_overhead_model(folder / "overhead.onnx", tuple(example_input.shape))
        write_manifest(
            folder, files, overhead=overhead, batch_size=int(example_input.shape[0]), meta={}
        )
        measured = measure_lut(folder, warmup=warmup, runs=runs, rounds=rounds, threads=threads)
    layers = {
        name: LayerGrid(
            name=name,
            kind=kind,
            in_channels=cin,
            out_channels=cout,
            input_shape=shape,
            in_widths=ins,
            out_widths=outs,
            ms=[[_entry_ms(measured, name, kind, i, o) for o in outs] for i in ins],
            fused=fused,
        )
        for name, (kind, cin, cout, shape, ins, outs, fused) in grids.items()
    }
    meta = {
        "model": type(model).__name__,
        "input_shape": list(example_input.shape),
        "round_to": round_to,
        "max_group_ratio": max_group_ratio,
        "grid_points": grid_points,
        "timings": len(files),
        "build_s": round(time.perf_counter() - started, 2),
        **{k: measured.meta.get(k) for k in ("warmup", "runs", "rounds", "providers")},
        "measured_at": measured.meta.get("measured_at"),
        "torch": torch.__version__,
    }
    return LayerLatencyTable(
        layers=layers,
        overhead_ms=measured.overhead_ms,
        batch_size=measured.batch_size,
        threads=threads,
        machine=measured.machine,
        meta=meta,
    )


def _entry_ms(measured: LatencyTable, name: str, kind: str, cin: int, cout: int) -> float:
    return 0.0 if kind == "unused" else measured.entries[f"{name}|{cin}|{cout}"].ms


def measure_model_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 10,
    runs: int = 100,
    rounds: int = 10,
    threads: int = 1,
) -> dict[str, float]:
    """Whole-model onnxruntime latency (ms, overhead *included*: what a prediction estimates).

    Returns ``{"median_ms", "p90_ms", "overhead_ms"}``; the model is exported like a table's
    layers (:func:`slimline.export.lut_blocks.export_block`) and timed with the same protocol.
    """
    modes = [(module, module.training) for module in model.modules()]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shape = tuple(example_input.shape)
        try:
            export_block(model, shape, folder / "model.onnx")  # switches to eval mode
        finally:
            for module, training in modes:
                module.training = training
        overhead = write_overhead_model(folder / "overhead.onnx", shape)
        write_manifest(
            folder,
            [BlockFile("model", "model.onnx", shape)],
            overhead=overhead,
            batch_size=shape[0],
        )
        table = measure_lut(folder, warmup=warmup, runs=runs, rounds=rounds, threads=threads)
    entry = table.entries["model"]
    return {"median_ms": entry.median_ms, "p90_ms": entry.p90_ms, "overhead_ms": table.overhead_ms}
