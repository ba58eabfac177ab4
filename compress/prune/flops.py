"""FLOPs and parameter counts, total and per layer.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` at the dispatcher level, so
they include the matrix products a module's ``forward`` does without a submodule (attention's
``q @ k^T`` and ``attn @ v``) as well as convolutions and linear layers. Like that counter, one
multiply-accumulate is **2 FLOPs**, and element-wise work (BN, activations, adds, softmax) is not
counted: on the models we prune it is a few percent of the total and pruning scales it with the
channels anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass at the example's batch size, and parameter count."""

    total: int
    params: int
    # Dotted module name ("" for the root) -> FLOPs inside that module, children included.
    per_module: dict[str, int] = field(default_factory=dict)

    def own(self, model: nn.Module, name: str) -> int:
        """FLOPs of module ``name`` minus those of its direct children (its own matmuls)."""
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        children = sum(
            self.per_module.get(prefix + child, 0) for child, _ in module.named_children()
        )
        return self.per_module.get(name, 0) - children


@torch.no_grad()
def count_flops(model: nn.Module, example_input: torch.Tensor) -> FlopCount:
    """Count FLOPs (2 per multiply-accumulate) of ``model(example_input)`` in eval mode.

    Use a batch of one to get per-sample FLOPs. The model's train/eval modes are restored.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    counter = FlopCounterMode(display=False)
    # In eval mode torch's TransformerEncoderLayer / MultiheadAttention take a fused "fast
    # path" (one native op) that the counter cannot see into, and the fused CPU attention
    # kernels are not in its table either: count the ordinary ops (math attention) instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, sdpa_kernel(SDPBackend.MATH):
            model(example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training
    per_module: dict[str, int] = {}
    root = type(model).__name__
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        # FlopCounterMode names modules "<RootClass>.<dotted.path>"; the root is "<RootClass>".
        name = "" if key == root else key.removeprefix(root + ".")
        per_module[name] = per_module.get(name, 0) + int(sum(ops.values()))
    return FlopCount(
        total=int(counter.get_total_flops()), params=count_params(model), per_module=per_module
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total
