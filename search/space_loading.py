"""Turning space data (a recipe mapping or a YAML file) into a space of whichever family it names.

Each family's class parses only its own keys; picking the class from the ``family:`` key means
knowing every family, the union included (which parses its members back through here). Keeping
that dispatch out of :mod:`slimline.search.space` leaves the ``resnet_flex`` space unaware of the
other families, and gives every caller that accepts any family one entry point above them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimline.search.grid_families import grid_space_from_dict
from slimline.search.space import FAMILY, SearchSpace
from slimline.search.spaces_union import UnionSpace

__all__ = ["load_space", "space_from_dict"]


def space_from_dict(data: Mapping[str, Any], *, source: str = "search space") -> Any:
    """Build the space its ``family:`` key names (default ``resnet_flex``, so older YAML works).

    Families: ``resnet_flex`` (:class:`SearchSpace`), ``vit``, ``cnn1d``, ``gru``
    (:mod:`slimline.search.grid_families`) and ``union`` (several families in one space,
    :mod:`slimline.search.spaces_union`).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
    family = data.get("family", FAMILY)
    if family == FAMILY:
        return SearchSpace.from_dict(data, source=source)
    if family == "union":
        return UnionSpace.from_dict(data, source=source)
    return grid_space_from_dict(data, source=source)


def load_space(path: str | os.PathLike) -> Any:
    """Read a space of any family from YAML (or JSON); errors name the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping with a family and its choices")
    return space_from_dict(data, source=str(path))
