"""The ``resnet_flex`` search space: the choices a ResNet-style CNN search may make, and the rules.

A space is a stem plus stages; each stage chooses a width, a depth and a kernel size from its
own lists and has a fixed stride. An :class:`~slimline.search.architecture.Architecture` is one
choice per stage. The space is data (YAML or a dict)::

    name: digits-resnet
    input_shape: [1, 8, 8]        # C, H, W of one sample
    num_classes: 10
    stages:                       # the stem has the first stage's width
      - {widths: [8, 16, 24], depths: [1, 2], kernels: [3, 5], stride: 1}
      - {widths: [16, 32, 48], depths: [1, 2], kernels: [3, 5], stride: 2}

Every architecture decomposes into blocks (:meth:`SearchSpace.blocks`) that depend only on
their own shapes, so a latency lookup table measured once per distinct block
(:meth:`SearchSpace.distinct_blocks`, ``slimline profile lut``) predicts any architecture.
This module is torch-free except :meth:`SearchSpace.build_model` / :meth:`build_block`.

The values it produces (architectures, blocks, digests) are in :mod:`slimline.search.architecture`.
Other families (``vit``, ``cnn1d``, ``gru``: :mod:`slimline.search.grid_families`; mixes of them:
:mod:`slimline.search.spaces_union`) share the same duck-typed interface;
:func:`slimline.search.space_loading.space_from_dict` and
:func:`~slimline.search.space_loading.load_space` pick the class from the ``family:`` key.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimline.search.architecture import Architecture, BlockSpec, StageChoices, content_digest

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["FAMILY", "SearchSpace", "default_space"]

FAMILY = "resnet_flex"


@dataclass(frozen=True)
class SearchSpace:
    name: str
    in_channels: int
    input_size: tuple[int, int]
    num_classes: int
    stages: tuple[StageChoices, ...]

    # ---- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "search space") -> SearchSpace:
        """Validate and build; errors name ``source`` and the offending key."""

        def fail(key: str, message: str) -> ValueError:
            return ValueError(f"{source}: {key}: {message}")

        unknown = set(data) - {"name", "input_shape", "num_classes", "stages", "family"}
        if unknown:
            raise fail(
                sorted(unknown)[0],
                "unknown key (known: name, input_shape, num_classes, stages, family)",
            )
        if data.get("family", FAMILY) != FAMILY:
            raise fail("family", f"only {FAMILY!r} is supported, got {data['family']!r}")
        shape = data.get("input_shape")
        if not isinstance(shape, Sequence) or len(shape) != 3 or not _positive_ints(shape):
            raise fail("input_shape", f"expected [C, H, W] of positive integers, got {shape!r}")
        num_classes = data.get("num_classes", 10)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise fail("num_classes", f"expected a positive integer, got {num_classes!r}")
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, Sequence) or not raw_stages:
            raise fail("stages", "expected a non-empty list of stages")
        stages = []
        for i, stage in enumerate(raw_stages):
            where = f"stages[{i}]"
            if not isinstance(stage, Mapping):
                raise fail(where, f"expected a mapping, got {stage!r}")
            extra = set(stage) - {"widths", "depths", "kernels", "stride", "expansions", "skips"}
            if extra:
                raise fail(
                    f"{where}.{sorted(extra)[0]}",
                    "unknown key (known: widths, depths, kernels, stride, expansions, skips)",
                )
            values = {}
            for key in ("widths", "depths", "kernels"):
                choices = stage.get(key, [3] if key == "kernels" else None)
                if not isinstance(choices, Sequence) or not choices or not _positive_ints(choices):
                    raise fail(
                        f"{where}.{key}", f"expected a list of positive integers, got {choices!r}"
                    )
                if len(set(choices)) != len(choices):
                    raise fail(f"{where}.{key}", f"choices repeat: {list(choices)}")
                values[key] = tuple(int(c) for c in choices)
            if any(k % 2 == 0 for k in values["kernels"]):
                raise fail(
                    f"{where}.kernels", f"kernels must be odd, got {list(values['kernels'])}"
                )
            stride = stage.get("stride", 1)
            if not isinstance(stride, int) or stride < 1:
                raise fail(f"{where}.stride", f"expected a positive integer, got {stride!r}")
            expansions = stage.get("expansions", [1.0])
            if (not isinstance(expansions, Sequence) or not expansions
                    or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0
                               for e in expansions)
                    or len(set(expansions)) != len(expansions)):
                raise fail(f"{where}.expansions", "expected distinct positive numbers, got "
                           f"{expansions!r}")
            skips = stage.get("skips", [True])
            if (not isinstance(skips, Sequence) or not skips
                    or not all(isinstance(v, bool) for v in skips) or len(set(skips)) != len(skips)):
                raise fail(f"{where}.skips", f"expected [true], [false] or [true, false], got "
                           f"{skips!r}")
            stages.append(StageChoices(**values, stride=stride,
                                       expansions=tuple(float(e) for e in expansions),
                                       skips=tuple(skips)))
        return cls(
            name=str(data.get("name", "space")),
            in_channels=int(shape[0]),
            input_size=(int(shape[1]), int(shape[2])),
            num_classes=num_classes,
            stages=tuple(stages),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": FAMILY,
            "input_shape": [self.in_channels, *self.input_size],
            "num_classes": self.num_classes,
            "stages": [
                {
                    "widths": list(s.widths),
                    "depths": list(s.depths),
                    "kernels": list(s.kernels),
                    "stride": s.stride,
                }
                | ({"expansions": list(s.expansions)} if s.expansions != (1.0,) else {})
                | ({"skips": list(s.skips)} if s.skips != (True,) else {})
                for s in self.stages
            ],
        }

    @property
    def digest(self) -> str:
        return content_digest(self.to_dict())

    # ---- architectures ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        """How many distinct architectures the space holds."""
        return math.prod(len(s.widths) * len(s.depths) * len(s.kernels) * len(s.expansions)
                         * len(s.skips) for s in self.stages)

    def architecture_from_dict(self, data: Mapping[str, Any]) -> Architecture:
        """The inverse of ``Architecture.to_dict`` (validated against this space)."""
        return self.validate(Architecture.from_dict(data))

    def sample(self, count: int, *, seed: int = 0) -> list[Architecture]:
        """``count`` distinct architectures drawn uniformly with ``seed`` (same seed, same list;
        all of them, in random order, when ``count`` >= :attr:`size`)."""
        rng = random.Random(seed)
        count = min(count, self.size)
        seen: dict[Architecture, None] = {}
        while len(seen) < count:
            arch = Architecture(
                tuple(rng.choice(s.widths) for s in self.stages),
                tuple(rng.choice(s.depths) for s in self.stages),
                tuple(rng.choice(s.kernels) for s in self.stages),
                # Single-option choices draw nothing, so older spaces sample as they always did.
                tuple(_pick(rng, s.expansions) for s in self.stages),
                tuple(_pick(rng, s.skips) for s in self.stages),
            )
            seen.setdefault(arch, None)
        return list(seen)

    def trial_choices(self) -> dict[str, tuple[int, ...]]:
        """Flat ``{name: options}`` (``s0.width``, ``s0.depth``, ``s0.kernel``, ``s1.width``,
        ...) for a sampler to pick from."""
        out: dict[str, tuple[int, ...]] = {}
        for i, stage in enumerate(self.stages):
            out.update({f"s{i}.width": stage.widths, f"s{i}.depth": stage.depths,
                        f"s{i}.kernel": stage.kernels})
            if len(stage.expansions) > 1:
                out[f"s{i}.expansion"] = stage.expansions
            if len(stage.skips) > 1:
                out[f"s{i}.skip"] = stage.skips
        return out

    def from_trial_choices(self, picks: Mapping[str, Any]) -> Architecture:
        """The architecture ``picks`` (keyed as in :meth:`trial_choices`) describes."""
        n = range(len(self.stages))
        return self.validate(Architecture(
            tuple(int(picks[f"s{i}.width"]) for i in n),
            tuple(int(picks[f"s{i}.depth"]) for i in n),
            tuple(int(picks[f"s{i}.kernel"]) for i in n),
            tuple(float(picks.get(f"s{i}.expansion", s.expansions[0]))
                  for i, s in enumerate(self.stages)),
            tuple(bool(picks.get(f"s{i}.skip", s.skips[0])) for i, s in enumerate(self.stages)),
        ))

    def validate(self, arch: Architecture) -> Architecture:
        """``arch`` if the space can produce it; otherwise ValueError naming the stage."""
        lengths = {len(arch.widths), len(arch.depths), len(arch.kernels), len(self.stages)}
        lengths |= {len(v) for v in (arch.expansions, arch.skips) if v}
        if len(lengths) != 1:
            raise ValueError(
                f"{arch} has a different number of stages than space {self.name!r} "
                f"({len(self.stages)})"
            )
        for i, (stage, w, d, k) in enumerate(
            zip(self.stages, arch.widths, arch.depths, arch.kernels)
        ):
            for label, value, choices in (
                ("width", w, stage.widths),
                ("depth", d, stage.depths),
                ("kernel", k, stage.kernels),
                ("expansion", arch.expansion(i), stage.expansions),
                ("skip", arch.skip(i), stage.skips),
            ):
                if value not in choices:
                    raise ValueError(
                        f"stage {i} {label} {value} is not in space {self.name!r} "
                        f"(choices: {list(choices)})"
                    )
        return arch

    def blocks(self, arch: Architecture) -> list[BlockSpec]:
        """The network's parts in execution order: stem, every block, head."""
        self.validate(arch)
        size = self.input_size
        parts = [BlockSpec("stem", self.in_channels, arch.widths[0], 3, 1, size)]
        channels = arch.widths[0]
        for i, (stage, width, depth, kernel) in enumerate(
            zip(self.stages, arch.widths, arch.depths, arch.kernels)
        ):
            for index in range(depth):
                stride = stage.stride if index == 0 else 1
                parts.append(BlockSpec("block", channels, width, kernel, stride, size,
                                       arch.expansion(i), arch.skip(i)))
                size, channels = parts[-1].output_size, width
        parts.append(BlockSpec("head", channels, self.num_classes, 1, 1, size))
        return parts

    def block_keys(self, arch: Architecture) -> list[str]:
        return [block.key for block in self.blocks(arch)]

    def distinct_blocks(self) -> list[BlockSpec]:
        """Every block any architecture of the space contains, each once (for the LUT)."""
        found: dict[str, BlockSpec] = {}
        size = self.input_size
        for w in self.stages[0].widths:
            stem = BlockSpec("stem", self.in_channels, w, 3, 1, size)
            found.setdefault(stem.key, stem)
        previous = self.stages[0].widths
        for index, stage in enumerate(self.stages):
            out_size = BlockSpec("block", 1, 1, 1, stage.stride, size).output_size
            # The stem has stage 0's width, so stage 0's first block never changes channels.
            pairs = (
                [(w, w) for w in stage.widths]
                if index == 0
                else list(itertools.product(previous, stage.widths))
            )
            variants = list(itertools.product(stage.expansions, stage.skips))
            for (c_in, c_out), k, (e, skip) in itertools.product(pairs, stage.kernels, variants):
                first = BlockSpec("block", c_in, c_out, k, stage.stride, size, e, skip)
                found.setdefault(first.key, first)
            if max(stage.depths) > 1:
                for c, k, (e, skip) in itertools.product(stage.widths, stage.kernels, variants):
                    repeat = BlockSpec("block", c, c, k, 1, out_size, e, skip)
                    found.setdefault(repeat.key, repeat)
            previous, size = stage.widths, out_size
        for w in previous:
            head = BlockSpec("head", w, self.num_classes, 1, 1, size)
            found.setdefault(head.key, head)
        return list(found.values())

    # ---- models (torch) --------------------------------------------------------------------
    def model_spec(self, arch: Architecture) -> dict[str, Any]:
        """The recipe ``model:`` entry that builds ``arch``."""
        self.validate(arch)
        return {
            "name": FAMILY,
            "with": arch.to_dict()
            | {
                "strides": [s.stride for s in self.stages],
                "num_classes": self.num_classes,
                "in_channels": self.in_channels,
                "input_size": list(self.input_size),
            },
        }

    def build_model(self, arch: Architecture) -> nn.Module:
        from slimline.models import build_model

        spec = self.model_spec(arch)
        return build_model(spec["name"], **spec["with"])

    def build_block(self, block: BlockSpec) -> nn.Module:
        from slimline.models.flexnet import FlexBlock, FlexHead, FlexStem

        if block.kind == "stem":
            return FlexStem(block.in_channels, block.out_channels)
        if block.kind == "head":
            return FlexHead(block.in_channels, block.out_channels)
        return FlexBlock(block.in_channels, block.out_channels, block.stride, block.kernel,
                         block.expansion, block.skip)


def default_space() -> SearchSpace:
    """A small space for 8x8 digits: 3 stages, widths around resnet's 16/32/64, depth 1-2,
    kernels 3/5 (1,728 architectures, 60 distinct blocks)."""
    return SearchSpace.from_dict(
        {
            "name": "digits-resnet-flex",
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            "stages": [
                {"widths": [8, 16, 24], "depths": [1, 2], "kernels": [3, 5], "stride": 1},
                {"widths": [16, 32, 48], "depths": [1, 2], "kernels": [3, 5], "stride": 2},
                {"widths": [32, 64, 96], "depths": [1, 2], "kernels": [3, 5], "stride": 2},
            ],
        },
        source="default_space()",
    )


def _pick(rng: random.Random, options: Sequence[Any]) -> Any:
    return options[0] if len(options) == 1 else rng.choice(options)


def _positive_ints(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
