"""The grid machinery every non-``resnet_flex`` family is built on (the families themselves:
:mod:`slimline.search.grid_families`; :mod:`slimline.search.spaces_union` mixes families in one
space).

Each space is a grid of named choice lists, some global (a GRU's ``hidden_sizes``), some per stage
(a 1-D CNN's ``stages[i].widths``). An architecture (:class:`GridArchitecture`) is one value per
choice, tagged with its family, so architectures of different families never hash equal::

    family: vit                      family: cnn1d                    family: gru
    input_shape: [1, 8, 8]           input_shape: [1, 40]             input_shape: [1, 40]
    patch_size: 2                    stages:                          hidden_sizes: [16, 32, 64]
    depths: [1, 2, 3]                  - {widths: [8, 16], depths:    num_layers: [1, 2]
    widths: [16, 32, 64]                  [1, 2], kernels: [3, 5]}
    heads: [1, 2, 4]
    mlp_ratios: [1.0, 2.0]

They share :class:`slimline.search.space.SearchSpace`'s duck-typed interface (``from_dict``/``to_dict``/
``digest``/``size``/``sample``/``validate``/``model_spec``/``build_model``), which is all the
search and the ground-truth builder use. Torch-free except ``build_model``.
"""

from __future__ import annotations

import itertools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from slimline.search.architecture import content_digest

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["Fail", "GridArchitecture", "GridSpace", "no_lookup_table"]

# Enumerate the whole grid (exact size under constraints, distinct samples without retries)
# when it is at most this large; bigger grids are sampled by rejection.
_ENUMERATE_LIMIT = 200_000


@dataclass(frozen=True)
class GridArchitecture:
    """One value per choice of a grid space (per-stage values are tuples, one per stage)."""

    family: str
    values: tuple[tuple[str, Any], ...]

    @classmethod
    def make(cls, family: str, values: Mapping[str, Any]) -> GridArchitecture:
        frozen = {
            key: tuple(v) if isinstance(v, (list, tuple)) else v for key, v in values.items()
        }
        return cls(family, tuple(sorted(frozen.items())))

    def __getitem__(self, key: str) -> Any:
        for name, value in self.values:
            if name == key:
                return value
        raise KeyError(f"{self.family} architecture has no {key!r} (has: {self.keys()})")

    def keys(self) -> list[str]:
        return [name for name, _ in self.values]

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family} | {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.values
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GridArchitecture:
        if "family" not in data:
            raise ValueError(f"architecture {dict(data)!r} has no 'family' key")
        return cls.make(str(data["family"]), {k: v for k, v in data.items() if k != "family"})

    @property
    def digest(self) -> str:
        """Stable 16-hex-digit content hash (family included)."""
        return content_digest(self.to_dict())

    def __str__(self) -> str:
        def show(v: Any) -> str:
            return "/".join(map(str, v)) if isinstance(v, tuple) else str(v)

        return f"{self.family}(" + ",".join(f"{k}={show(v)}" for k, v in self.values) + ")"


def no_lookup_table(family: str) -> str:
    return (f"a latency lookup table needs a 'resnet_flex' space, this one is {family!r}; "
            "measure latency instead (e.g. latency: measure)")


class Fail:
    """Builds ``ValueError("<source>: <key>: <message>")``: every parse error names its key."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.source}: {key}: {message}")


def _choice_list(fail: Fail, key: str, raw: Any, kind: type) -> tuple[Any, ...]:
    """A non-empty, repeat-free list of positive ``kind`` values (ints also accepted as floats)."""
    ok = isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) > 0
    if ok:
        for v in raw:
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not numeric or (kind is int and not isinstance(v, int)) or v <= 0:
                ok = False
    if not ok:
        raise fail(key, f"expected a non-empty list of positive {kind.__name__}s, got {raw!r}")
    values = tuple(kind(v) for v in raw)
    if len(set(values)) != len(values):
        raise fail(key, f"choices repeat: {list(raw)}")
    return values


class GridSpace(ABC):
    """A family's grid: global ``choices`` and per-stage ``stages`` choice lists.

    Subclasses set ``family``/``model_name``, the choice keys (space key -> architecture key),
    and map an architecture to the zoo builder's keyword arguments."""

    family: ClassVar[str]
    model_name: ClassVar[str]
    # space key (plural, a list of choices) -> (architecture key, value type)
    choice_keys: ClassVar[dict[str, tuple[str, type]]] = {}
    stage_keys: ClassVar[dict[str, tuple[str, type]]] = {}
    input_rank: ClassVar[int] = 2  # len(input_shape): [C, L] sequences, [C, H, W] images

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        choices: Mapping[str, tuple[Any, ...]],
        stages: Sequence[Mapping[str, tuple[Any, ...]]] = (),
        fixed: Mapping[str, Any] | None = None,
    ):
        self.name = name
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.choices = dict(choices)
        self.stages = tuple(dict(s) for s in stages)
        self.fixed = dict(fixed or {})

    # ---- (de)serialisation ----------------------------------------------------------------
    fixed_keys: ClassVar[dict[str, Any]] = {}  # extra scalar settings and their defaults

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "search space") -> GridSpace:
        """Validate and build; errors name ``source`` and the offending key."""
        fail = Fail(source)
        known = ["family", "name", "input_shape", "num_classes", *cls.fixed_keys,
                 *cls.choice_keys, *(["stages"] if cls.stage_keys else [])]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise fail(unknown[0], f"unknown key for family {cls.family!r} (known: "
                                   f"{', '.join(known)})")
        shape = data.get("input_shape")
        if (not isinstance(shape, Sequence) or len(shape) != cls.input_rank
                or not all(isinstance(v, int) and v > 0 for v in shape)):
            dims = "[C, L]" if cls.input_rank == 2 else "[C, H, W]"
            raise fail("input_shape", f"expected {dims} of positive integers, got {shape!r}")
        num_classes = data.get("num_classes", 10)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise fail("num_classes", f"expected a positive integer, got {num_classes!r}")
        choices = {}
        for key, (_, kind) in cls.choice_keys.items():
            if key not in data:
                raise fail(key, f"missing (family {cls.family!r} needs "
                                f"{', '.join(cls.choice_keys)})")
            choices[key] = _choice_list(fail, key, data[key], kind)
        stages = []
        if cls.stage_keys:
            raw = data.get("stages")
            if not isinstance(raw, Sequence) or not raw:
                raise fail("stages", "expected a non-empty list of stages")
            for i, stage in enumerate(raw):
                if not isinstance(stage, Mapping):
                    raise fail(f"stages[{i}]", f"expected a mapping, got {stage!r}")
                extra = sorted(set(stage) - set(cls.stage_keys))
                if extra:
                    raise fail(f"stages[{i}].{extra[0]}",
                               f"unknown key (known: {', '.join(cls.stage_keys)})")
                stages.append({
                    key: _choice_list(fail, f"stages[{i}].{key}", stage.get(key), kind)
                    for key, (_, kind) in cls.stage_keys.items()
                })
        fixed = {key: data.get(key, default) for key, default in cls.fixed_keys.items()}
        space = cls(str(data.get("name", cls.family)), tuple(shape), num_classes, choices,
                    stages, fixed)
        space._check(fail)
        return space

    def _check(self, fail: Fail) -> None:
        """Family-specific checks of the whole space (raise ``fail(key, message)``); an optional
        hook: families without cross-choice rules keep this no-op."""
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "family": self.family,
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            **self.fixed,
            **{key: list(values) for key, values in self.choices.items()},
        }
        if self.stage_keys:
            out["stages"] = [{k: list(v) for k, v in s.items()} for s in self.stages]
        return out

    @property
    def digest(self) -> str:
        return content_digest(self.to_dict())

    # ---- architectures ---------------------------------------------------------------------
    def _axes(self) -> list[tuple[str, int | None, tuple[Any, ...]]]:
        """(architecture key, stage index or None, choices) for every independent choice."""
        axes = [(arch_key, None, self.choices[key])
                for key, (arch_key, _) in self.choice_keys.items()]
        for i, stage in enumerate(self.stages):
            axes += [(arch_key, i, stage[key]) for key, (arch_key, _) in self.stage_keys.items()]
        return axes

    def _assemble(self, picks: Sequence[Any]) -> GridArchitecture:
        values: dict[str, Any] = {}
        per_stage: dict[str, list[Any]] = {}
        for (arch_key, stage, _), value in zip(self._axes(), picks):
            if stage is None:
                values[arch_key] = value
            else:
                per_stage.setdefault(arch_key, []).append(value)
        return GridArchitecture.make(self.family, values | per_stage)

    def _constraint_error(self, arch: GridArchitecture) -> str | None:
        """Why a grid point is not a valid network (None if it is)."""
        return None

    def _grid_size(self) -> int:
        return math.prod(len(choices) for _, _, choices in self._axes())

    def _enumerate(self) -> Iterator[GridArchitecture]:
        for picks in itertools.product(*(choices for _, _, choices in self._axes())):
            arch = self._assemble(picks)
            if self._constraint_error(arch) is None:
                yield arch

    @property
    def size(self) -> int:
        """How many distinct valid architectures the space holds."""
        if self._grid_size() <= _ENUMERATE_LIMIT:
            return sum(1 for _ in self._enumerate())
        return self._grid_size()  # constraint-free families only get this large

    def sample(self, count: int, *, seed: int = 0) -> list[GridArchitecture]:
        """``count`` distinct architectures drawn uniformly with ``seed`` (same seed, same list;
        all of them, in random order, when ``count`` >= :attr:`size`)."""
        rng = random.Random(seed)
        count = min(count, self._grid_size())
        if self._grid_size() <= _ENUMERATE_LIMIT:
            everything = list(self._enumerate())
            return rng.sample(everything, min(count, len(everything)))
        seen: dict[GridArchitecture, None] = {}
        axes = self._axes()
        while len(seen) < count:
            arch = self._assemble([rng.choice(choices) for _, _, choices in axes])
            if self._constraint_error(arch) is None:
                seen.setdefault(arch, None)
        return list(seen)

    def validate(self, arch: GridArchitecture) -> GridArchitecture:
        """``arch`` if the space can produce it; otherwise ValueError naming the choice."""
        if getattr(arch, "family", None) != self.family:
            raise ValueError(f"{arch} is not a {self.family!r} architecture (space {self.name!r})")
        expected = sorted({arch_key for arch_key, _, _ in self._axes()})
        if sorted(arch.keys()) != expected:
            raise ValueError(f"{arch} has keys {arch.keys()}, space {self.name!r} needs {expected}")
        for arch_key, stage, choices in self._axes():
            value = arch[arch_key]
            if stage is not None:
                if not isinstance(value, tuple) or len(value) != len(self.stages):
                    raise ValueError(f"{arch}: {arch_key} needs one value per stage "
                                     f"({len(self.stages)})")
                value = value[stage]
            if value not in choices:
                where = arch_key if stage is None else f"stage {stage} {arch_key}"
                raise ValueError(f"{where} {value!r} is not in space {self.name!r} "
                                 f"(choices: {list(choices)})")
        problem = self._constraint_error(arch)
        if problem:
            raise ValueError(f"{arch} is not valid in space {self.name!r}: {problem}")
        return arch

    def trial_choices(self) -> dict[str, tuple[Any, ...]]:
        """Flat ``{name: options}`` (``key`` or ``key[stage]``) for a sampler to pick from."""
        return {key if stage is None else f"{key}[{stage}]": choices
                for key, stage, choices in self._axes()}

    def from_trial_choices(self, picks: Mapping[str, Any]) -> GridArchitecture:
        """The architecture ``picks`` (keyed as in :meth:`trial_choices`) describes; ValueError
        when the combination is not a valid network (e.g. heads not dividing the width)."""
        return self.validate(self._assemble([picks[name] for name in self.trial_choices()]))

    def architecture_from_dict(self, data: Mapping[str, Any]) -> GridArchitecture:
        """The inverse of ``GridArchitecture.to_dict`` (validated against this space); values
        take the space's types, so ``mlp_ratio: 2`` and ``2.0`` give the same digest."""
        kinds = {arch_key: kind for arch_key, kind in
                 [*self.choice_keys.values(), *self.stage_keys.values()]}
        arch = GridArchitecture.from_dict(data)
        values = {
            key: (tuple(kinds[key](v) for v in value) if isinstance(value, tuple)
                  else kinds[key](value)) if key in kinds else value
            for key, value in arch.values
        }
        return self.validate(GridArchitecture.make(arch.family, values))

    def blocks(self, arch: GridArchitecture) -> list[Any]:
        """Latency lookup tables cover ``resnet_flex`` spaces only: clear error for the rest."""
        raise ValueError(no_lookup_table(self.family))

    def distinct_blocks(self) -> list[Any]:
        raise ValueError(no_lookup_table(self.family))

    # ---- models ----------------------------------------------------------------------------
    @abstractmethod
    def _model_kwargs(self, arch: GridArchitecture) -> dict[str, Any]:
        """The zoo builder's keyword arguments for ``arch`` (the family's own mapping)."""

    def model_spec(self, arch: GridArchitecture) -> dict[str, Any]:
        """The recipe ``model:`` entry that builds ``arch``."""
        self.validate(arch)
        return {
            "name": self.model_name,
            "with": self._model_kwargs(arch)
            | {
                "num_classes": self.num_classes,
                "in_channels": self.input_shape[0],
                "input_size": list(self.input_shape[1:]),
            },
        }

    def build_model(self, arch: GridArchitecture) -> nn.Module:
        from slimline.models import build_model

        spec = self.model_spec(arch)
        return build_model(spec["name"], **spec["with"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, size={self.size})"
