"""The concrete grid families of the model zoo: ``vit`` (images), ``cnn1d``, ``gru`` and
``seqformer`` (sequences).

Each family is only a table of choice keys, its cross-choice rules and the mapping onto its zoo
builder's arguments; the parsing, sampling and validation they share live in
:mod:`slimline.search.spaces_grid`, so adding a family means adding a small class here (and to
``GRID_FAMILIES``) without touching that machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from slimline.search.spaces_grid import Fail, GridArchitecture, GridSpace

__all__ = ["CNN1dSpace", "GRUSpace", "SeqformerSpace", "ViTSpace", "grid_space_from_dict"]


class TransformerGridSpace(GridSpace):
    """What the transformer families share: depth, width, heads and MLP ratio, with the width
    divisible by the head count."""

    choice_keys: ClassVar[dict[str, tuple[str, type]]] = {
        "depths": ("depth", int),
        "widths": ("width", int),
        "heads": ("heads", int),
        "mlp_ratios": ("mlp_ratio", float),
    }

    def _check(self, fail: Fail) -> None:
        if self.size == 0:
            raise fail("heads", "no width in 'widths' is divisible by any choice of heads")

    def _constraint_error(self, arch: GridArchitecture) -> str | None:
        if arch["width"] % arch["heads"]:
            return f"width {arch['width']} is not divisible by heads {arch['heads']}"
        return None

    def _model_kwargs(self, arch: GridArchitecture) -> dict[str, Any]:
        return {"depth": arch["depth"], "dim": arch["width"], "heads": arch["heads"],
                "mlp_ratio": arch["mlp_ratio"]}


class ViTSpace(TransformerGridSpace):
    """Zoo ``vit``: depth, embedding width, heads and MLP ratio; the patch size is fixed."""

    family = "vit"
    model_name = "vit"
    input_rank = 3
    fixed_keys: ClassVar[dict[str, Any]] = {"patch_size": 2}

    def _check(self, fail: Fail) -> None:
        patch = self.fixed["patch_size"]
        if not isinstance(patch, int) or patch < 1 or any(s % patch for s in self.input_shape[1:]):
            raise fail("patch_size", f"must be a positive integer dividing the image size "
                                     f"{list(self.input_shape[1:])}, got {patch!r}")
        super()._check(fail)

    def _model_kwargs(self, arch: GridArchitecture) -> dict[str, Any]:
        return {"patch_size": self.fixed["patch_size"], **super()._model_kwargs(arch)}


class CNN1dSpace(GridSpace):
    """Zoo ``cnn1d``: per stage a width, a depth (blocks) and a kernel; stage 0 keeps the length,
    every later stage halves it in its first block."""

    family = "cnn1d"
    model_name = "cnn1d"
    stage_keys: ClassVar[dict[str, tuple[str, type]]] = {
        "widths": ("widths", int),
        "depths": ("depths", int),
        "kernels": ("kernels", int),
    }

    def _check(self, fail: Fail) -> None:
        for i, stage in enumerate(self.stages):
            if any(k % 2 == 0 for k in stage["kernels"]):
                raise fail(f"stages[{i}].kernels",
                           f"kernels must be odd, got {list(stage['kernels'])}")

    def _model_kwargs(self, arch: GridArchitecture) -> dict[str, Any]:
        return {"channels": list(arch["widths"]), "depths": list(arch["depths"]),
                "kernel_size": list(arch["kernels"])}


class GRUSpace(GridSpace):
    """Zoo ``gru``: hidden size and number of stacked layers."""

    family = "gru"
    model_name = "gru"
    choice_keys: ClassVar[dict[str, tuple[str, type]]] = {
        "hidden_sizes": ("hidden_size", int),
        "num_layers": ("num_layers", int),
    }

    def _model_kwargs(self, arch: GridArchitecture) -> dict[str, Any]:
        return {"hidden_size": arch["hidden_size"], "num_layers": arch["num_layers"]}


class SeqformerSpace(TransformerGridSpace):
    """Zoo ``seqformer`` (torch ``nn.TransformerEncoder`` over time steps): depth, width, heads
    and MLP ratio; the patch size (time steps per token, 1 by default) is fixed."""

    family = "seqformer"
    model_name = "seqformer"
    fixed_keys: ClassVar[dict[str, Any]] = {"patch_size": 1}

    def _check(self, fail: Fail) -> None:
        patch = self.fixed["patch_size"]
        if not isinstance(patch, int) or patch < 1 or self.input_shape[1] % patch:
            raise fail("patch_size", f"must be a positive integer dividing the length "
                                     f"{self.input_shape[1]}, got {patch!r}")
        super()._check(fail)

    def _model_kwargs(self, arch: GridArchitecture) -> dict[str, Any]:
        return {"patch_size": self.fixed["patch_size"], **super()._model_kwargs(arch)}


GRID_FAMILIES: dict[str, type[GridSpace]] = {
    s.family: s for s in (ViTSpace, CNN1dSpace, GRUSpace, SeqformerSpace)}


def grid_space_from_dict(data: Mapping[str, Any], *, source: str = "search space") -> GridSpace:
    """A :class:`GridSpace` by its ``family:`` key."""
    family = data.get("family")
    if family not in GRID_FAMILIES:
        known = ", ".join(["resnet_flex", *GRID_FAMILIES, "union"])
        raise ValueError(f"{source}: family: unknown family {family!r} (known: {known})")
    return GRID_FAMILIES[family].from_dict(data, source=source)
