"""Inputs to feed an ONNX model that was not given any: random tensors of the shapes and dtypes
its graph declares, with the batch size chosen and dynamic dimensions given by name (torch-free).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .graph import TensorInfo

__all__ = ["PAD_ID_KEY", "pad_id_of", "random_inputs", "sample_feeds"]

# ONNX metadata key under which the exporter records a token model's padding id.
PAD_ID_KEY = "slimline.pad_token_id"
_COMPANIONS = ("attention_mask", "token_type_ids")


_RANDOM_DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "bool"})


def random_inputs(
    inputs: Sequence[TensorInfo],
    batch_size: int,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Random feeds for ``inputs`` (e.g. ``graph_summary(p).inputs``) at ``batch_size``.

    A dynamic dimension 0 becomes ``batch_size``; any other dynamic dimension is read from
    ``input_shapes`` (a full shape per input name; its dimension 0 is ignored when dynamic) or,
    by its name, from ``dims`` (e.g. ``{"seq": 128}`` for every token input).
    Floats are standard normal; integer inputs named like an attention mask are all ones (every
    token attended), other integers are 0/1 so they are valid indices into any embedding.

    Raises:
        ValueError: a shape cannot be determined, contradicts the model, or has an unsupported
            dtype; the message names the input and dimension.
    """
    input_shapes = dict(input_shapes or {})
    rng = rng if rng is not None else np.random.default_rng(0)
    unknown = set(input_shapes) - {info.name for info in inputs}
    if unknown:
        known = [info.name for info in inputs]
        raise ValueError(f"input_shapes names {sorted(unknown)} are not model inputs {known}")
    feeds = {}
    for info in inputs:
        shape = _concrete_shape(info, batch_size, input_shapes.get(info.name), dict(dims or {}))
        if info.dtype not in _RANDOM_DTYPES:
            supported = ", ".join(sorted(_RANDOM_DTYPES))
            raise ValueError(f"input {info.name!r} has dtype {info.dtype} (supported: {supported})")
        if info.dtype.startswith("float"):
            feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
        elif "mask" in info.name.lower():
            feeds[info.name] = np.ones(shape, dtype=info.dtype)
        else:
            feeds[info.name] = rng.integers(0, 2, size=shape).astype(info.dtype)
    return feeds


def pad_id_of(metadata: Mapping[str, str]) -> int | None:
    """The padding id a token model's file records (``metadata_props`` as a dict), if any."""
    value = metadata.get(PAD_ID_KEY)
    return int(value) if value not in (None, "") else None


def sample_feeds(inputs: Sequence[TensorInfo], x: np.ndarray,
                 pad_id: int | None = None) -> dict[str, np.ndarray]:
    """The feeds of samples ``x`` for a model whose first input takes them: a single-input
    model gets ``x`` alone; a token model (``input_ids`` plus ``attention_mask`` and/or
    ``token_type_ids``) gets the mask derived from the ids (``ids != pad_id``, all ones without
    a pad id) and zero token types, as the PyTorch wrapper does.

    Raises:
        ValueError: other inputs that cannot be derived from ``x`` (pass a dict instead).
    """
    first, *rest = inputs
    others = [info.name for info in rest if info.name not in _COMPANIONS]
    if others:
        raise ValueError(f"the model's inputs {[i.name for i in inputs]} are not all derivable "
                         f"from one array ({others}): pass {{input name: array}}")
    dtype = first.dtype if first.dtype in _RANDOM_DTYPES else "float32"
    ids = np.asarray(x).astype(dtype)
    feeds = {first.name: ids}
    for info in rest:
        if info.name == "attention_mask":
            keep = ids != pad_id if pad_id is not None else np.ones_like(ids, dtype=bool)
            feeds[info.name] = keep.astype(info.dtype)
        else:
            feeds[info.name] = np.zeros(ids.shape, dtype=info.dtype)
    return feeds


def _concrete_shape(info: TensorInfo, batch_size: int, given: Sequence[int] | None,
                    named: Mapping[str, int]) -> list[int]:
    name, dims = info.name, info.shape
    if given is not None and len(given) != len(dims):
        raise ValueError(f"input_shapes[{name!r}] has {len(given)} dims, the input has {len(dims)}")
    shape = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:  # fixed by the model
            if axis == 0 and dim != batch_size:
                raise ValueError(
                    f"input {name!r} has a fixed batch dimension of {dim}, so batch size "
                    f"{batch_size} cannot be used; re-export with a dynamic batch dimension"
                )
            if axis > 0 and given is not None and given[axis] != dim:
                raise ValueError(
                    f"input_shapes[{name!r}] sets dim {axis} to {given[axis]}, "
                    f"but the model fixes it to {dim}"
                )
            shape.append(dim)
        elif axis == 0:
            shape.append(batch_size)
        elif given is not None and given[axis] > 0:
            shape.append(int(given[axis]))
        elif isinstance(dim, str) and dim in named:
            shape.append(int(named[dim]))
        else:
            label = f" ({dim!r})" if isinstance(dim, str) else ""
            raise ValueError(
                f"input {name!r} dim {axis}{label} is dynamic; give its size with "
                f"input_shapes={{{name!r}: [...]}} (CLI: --input-shape {name}=...)"
                + (" or, for token models, --seq-len N" if dim == "seq" else "")
            )
    return shape
