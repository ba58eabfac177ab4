"""Record and replay structural changes (pruned channels, removed heads, folded norms).

Artifacts store a model as "builder spec + state_dict" (never a pickled module). A stage that
physically shrinks layers changes shapes the builder alone would not reproduce, so on save we
diff the model against a fresh build of its spec and keep the difference as data::

    {"layer1.0.conv1": {"attrs": {"out_channels": 12}, "tensors": {"weight": [12, 16, 3, 3]}},
     "layer1.0.bn1":   {"attrs": {"num_features": 12}, "tensors": {"weight": [12], ...}},
     "blocks.0.attn":  {"attrs": {"num_heads": 3}},
     "features.1.bn":  {"replace": "Identity"}}

On load, :func:`apply_structure` sets those attributes and re-allocates those tensors at the
recorded shapes; ``load_state_dict`` then fills in the values. This works for any module type
whose forward reads its shapes from attributes and tensors (all of torch.nn's layers do), so
structured pruners need no per-architecture save code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

_REPLACEMENTS: dict[str, type[nn.Module]] = {"Identity": nn.Identity}
_PLAIN = (int, float, bool, str, type(None))


class StructureError(ValueError):
    """A structural change that cannot be recorded as data."""


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    attrs = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, _PLAIN) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)
        ):
            attrs[name] = list(value) if isinstance(value, tuple) else value
    return attrs


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(module.named_parameters(recurse=False))
    found.update({n: b for n, b in module.named_buffers(recurse=False) if b is not None})
    return found


def structure_diff(reference: nn.Module, model: nn.Module) -> dict[str, dict[str, Any]]:
    """What differs in ``model`` from ``reference`` (a fresh build of the same spec)."""
    reference_modules = dict(reference.named_modules())
    model_modules = dict(model.named_modules())
    diff: dict[str, dict[str, Any]] = {}
    for name, module in model_modules.items():
        original = reference_modules.get(name)
        if original is None:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent in diff and "replace" in diff[parent]:
                continue
            raise StructureError(f"layer {name!r} ({type(module).__name__}) was added; "
                                 "only shape changes and replacement by Identity are recorded")
        if type(module) is not type(original):
            if type(module).__name__ in _REPLACEMENTS:
                diff[name] = {"replace": type(module).__name__}
                continue
            raise StructureError(f"layer {name!r} changed type {type(original).__name__} -> "
                                 f"{type(module).__name__}; cannot be recorded")
        entry: dict[str, Any] = {}
        before, after = _plain_attrs(original), _plain_attrs(module)
        attrs = {k: v for k, v in after.items() if before.get(k) != v}
        if attrs:
            entry["attrs"] = attrs
        tensors_before, tensors_after = _tensors(original), _tensors(module)
        shapes = {k: list(t.shape) for k, t in tensors_after.items()
                  if k not in tensors_before or tensors_before[k].shape != t.shape}
        if shapes:
            entry["tensors"] = shapes
        if entry:
            diff[name] = entry
    for name in reference_modules:
        if name not in model_modules and not any(
            name.startswith(f"{replaced}.") for replaced, e in diff.items() if "replace" in e
        ):
            raise StructureError(f"layer {name!r} was removed; replace it by nn.Identity instead")
    return diff


@torch.no_grad()
def apply_structure(model: nn.Module, diff: dict[str, dict[str, Any]]) -> nn.Module:
    """Replay a recorded :func:`structure_diff` on a fresh build (values come from the weights)."""
    for name, entry in diff.items():
        if "replace" in entry:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _REPLACEMENTS[entry["replace"]]())
            continue
        module = model.get_submodule(name)
        for attr, value in entry.get("attrs", {}).items():
            current = getattr(module, attr, None)
            setattr(module, attr, tuple(value) if isinstance(current, tuple) else value)
        existing = _tensors(module)
        for tensor_name, shape in entry.get("tensors", {}).items():
            like = existing.get(tensor_name)
            dtype = like.dtype if like is not None else torch.float32
            empty = torch.zeros(shape, dtype=dtype)
            if tensor_name in module._parameters:
                # A slot that was None (a conv without bias that gained one from BN folding)
                # becomes a trainable parameter, like every other weight.
                old = module._parameters[tensor_name]
                module._parameters[tensor_name] = nn.Parameter(
                    empty, requires_grad=old.requires_grad if old is not None else True)
            else:
                module._buffers[tensor_name] = empty
    return model
