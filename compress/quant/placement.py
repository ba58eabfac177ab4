"""Where activations get quantized: tensor points chosen so ONNX Runtime runs int8 kernels.

ONNX Runtime turns a QDQ graph into integer kernels by pattern: ``DQ(x), DQ(w) -> Conv -> Q``
becomes QLinearConv, ``DQ(a), DQ(b) -> Add -> Q`` becomes QLinearAdd, ``DQ -> Gemm/MatMul``
becomes QGemm / MatMulIntegerToFloat, and a ``Relu -> Q`` whose zero point is the grid minimum
loses the Relu (the clamp of Q does its job). So the rules, on the torch.fx dataflow graph, are:

1. the input of every quantized Conv/Linear is quantized;
2. the output of every quantized Conv is quantized, after walking through directly following
   ``Identity`` (a folded BN) and ``ReLU``/``ReLU6`` modules — the output Q that makes the conv a
   QLinearConv; before a residual add this also quantizes the add's input. A Linear gets the
   same only when a ReLU follows it: ONNX Runtime would otherwise fuse ``Gemm + Relu`` into a
   float FusedGemm before the QDQ fusion sees it (a Linear alone runs as QGemm /
   MatMulIntegerToFloat with a float output and needs no output Q).

A tensor produced by a module becomes an ``output`` point of that module (all consumers then
read the quantized tensor — both inputs of a residual add included); a tensor produced by a
function (flatten, getitem, the model input) becomes an ``input`` point of each quantized
module reading it. Models fx cannot trace get rule 1 as input points and rule 2 as output
points of the convs themselves: still correct, fewer fusions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from slimline.compress.quant.state import TensorPoint

__all__ = ["ActivationPlan", "plan_activation_points"]

log = logging.getLogger(__name__)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RELUS = (nn.ReLU, nn.ReLU6)
_PASS_THROUGH = (nn.Identity, *_RELUS)


@dataclass
class ActivationPlan:
    """Points to quantize (in first-use order) and which point feeds each quantized module."""

    points: list[TensorPoint]
    module_inputs: dict[str, TensorPoint]
    traced: bool  # False: fx could not trace the model and the fallback rules were used


def plan_activation_points(
    model: nn.Module, quantized: Iterable[str], own_input: Iterable[str] = (),
    *, inside_leaves: bool = True,
) -> ActivationPlan:
    """Activation points for a model whose modules ``quantized`` (names) get int8 weights.

    Modules in ``own_input`` always get an input point of their own, never the producer's
    output point: a smoothed Linear's input is divided by its own ``s`` before it is quantized,
    which its producer's other consumers must not see. ``inside_leaves``: modules inside a
    torch.nn container fx does not trace into get input points too (observed at run time;
    a data-free quantizer, which has no run time, leaves them out).
    """
    quantized = list(quantized)
    own_input = set(own_input)
    modules = dict(model.named_modules())
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        log.info(
            "fx cannot trace %s (%s): quantizing module inputs/outputs only",
            type(model).__name__,
            exc,
        )
        return _fallback_plan(modules, quantized)

    points: dict[str, TensorPoint] = {}
    module_inputs: dict[str, TensorPoint] = {}
    wanted = set(quantized)
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and source.op == "call_module" and (
            node.target not in own_input
        ):
            point = TensorPoint(str(source.target), "output")
        else:
            point = TensorPoint(str(node.target), "input")
        module_inputs.setdefault(str(node.target), point)
        points.setdefault(point.key, point)
        end = _through_pass_through(node, modules)
        if isinstance(modules[node.target], _CONVS) or any(
            isinstance(modules[str(n.target)], _RELUS) for n in _chain(node, end)
        ):
            output = TensorPoint(str(end.target), "output")
            points.setdefault(output.key, output)
    missing = wanted - set(module_inputs)
    # fx keeps torch.nn's own containers (nn.TransformerEncoder, ...) as leaves, so their
    # Linears never show up as calls: they get input points of their own, observed at run time
    # (one whose hooks never fire stays unobserved, and the quantizer drops its point).
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"} if inside_leaves else ()
    for name in sorted(m for m in missing if any(m.startswith(f"{c}.") for c in called)):
        point = TensorPoint(name, "input")
        module_inputs[name] = points.setdefault(point.key, point)
        if isinstance(modules[name], _CONVS):
            output = TensorPoint(name, "output")
            points.setdefault(output.key, output)
    missing = wanted - set(module_inputs)
    if missing:  # defined but never called in forward: nothing to quantize at run time
        log.info("modules never called in forward: %s", ", ".join(sorted(missing)))
    return ActivationPlan(list(points.values()), module_inputs, traced=True)


def _through_pass_through(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The last node of the chain ``node -> Identity/ReLU -> ...`` where each link is the only
    consumer of the one before."""
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if (
            user.op == "call_module"
            and isinstance(modules.get(user.target), _PASS_THROUGH)
            and user.args[:1] == (current,)
        ):
            current = user
        else:
            break
    return current


def _chain(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """The nodes after ``start`` up to ``end`` on a single-consumer chain."""
    nodes, current = [], start
    while current is not end:
        current = next(iter(current.users))
        nodes.append(current)
    return nodes


def _fallback_plan(modules: dict[str, nn.Module], quantized: list[str]) -> ActivationPlan:
    points: dict[str, TensorPoint] = {}
    module_inputs = {}
    for name in quantized:
        point = TensorPoint(name, "input")
        points[point.key] = module_inputs[name] = point
        if isinstance(modules[name], _CONVS):
            output = TensorPoint(name, "output")
            points[output.key] = output
    return ActivationPlan(list(points.values()), module_inputs, traced=False)
