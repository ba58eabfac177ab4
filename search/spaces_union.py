"""A search space made of several spaces of different families (e.g. 1-D CNNs and GRUs on the
same sequences), sampled in fixed shares::

    family: union
    name: mnist1d-seq
    spaces: [{family: cnn1d, ...}, {family: gru, ...}]
    weights: [28, 16]          # share of a sample per member (default: equal)

Architectures keep their own family, so every call goes to the member of that family.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from slimline.search.architecture import content_digest
from slimline.search.spaces_grid import Fail, no_lookup_table

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["UnionSpace"]


def _family(space: Any) -> str:
    return space.to_dict().get("family", "resnet_flex")


class UnionSpace:
    """Several spaces of different families searched as one; ``weights`` set each member's share
    of a sample (default equal). An architecture goes to the member of its family."""

    family = "union"

    def __init__(self, name: str, members: Sequence[Any], weights: Sequence[float]):
        self.name = name
        self.members = tuple(members)
        self.weights = tuple(float(w) for w in weights)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "search space") -> UnionSpace:
        from slimline.search.space_loading import space_from_dict

        fail = Fail(source)
        unknown = sorted(set(data) - {"family", "name", "spaces", "weights"})
        if unknown:
            raise fail(unknown[0], "unknown key for family 'union' (known: family, name, "
                                   "spaces, weights)")
        raw = data.get("spaces")
        if not isinstance(raw, Sequence) or not raw:
            raise fail("spaces", "expected a non-empty list of spaces")
        members = []
        for i, member in enumerate(raw):
            if isinstance(member, Mapping) and member.get("family") == "union":
                raise fail(f"spaces[{i}].family", "a union cannot contain a union")
            members.append(space_from_dict(member, source=f"{source}: spaces[{i}]"))
        families = [_family(m) for m in members]
        if len(set(families)) != len(families):
            raise fail("spaces", f"each family may appear once, got {families}")
        weights = data.get("weights", [1.0] * len(members))
        if (not isinstance(weights, Sequence) or len(weights) != len(members)
                or not all(isinstance(w, (int, float)) and w > 0 for w in weights)):
            raise fail("weights", f"expected {len(members)} positive numbers, got {weights!r}")
        return cls(str(data.get("name", "union")), members, weights)

    def to_dict(self) -> dict[str, Any]:
        return {"family": "union", "name": self.name,
                "spaces": [m.to_dict() for m in self.members], "weights": list(self.weights)}

    @property
    def digest(self) -> str:
        return content_digest(self.to_dict())

    @property
    def size(self) -> int:
        return sum(m.size for m in self.members)

    def member(self, arch: Any) -> Any:
        """The member space of ``arch``'s family."""
        family = getattr(arch, "family", "resnet_flex")
        for m in self.members:
            if _family(m) == family:
                return m
        raise ValueError(f"space {self.name!r} has no {family!r} member for {arch}")

    def counts(self, count: int) -> list[int]:
        """Per-member share of ``count`` by weight (largest remainder), capped by member size;
        what a capped member cannot take goes to the others in order."""
        total = sum(self.weights)
        exact = [count * w / total for w in self.weights]
        shares = [math.floor(x) for x in exact]
        order = sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])
        for i in order[: count - sum(shares)]:
            shares[i] += 1
        sizes = [m.size for m in self.members]
        spill = sum(max(0, s - n) for s, n in zip(shares, sizes))
        shares = [min(s, n) for s, n in zip(shares, sizes)]
        for i, n in enumerate(sizes):
            extra = min(spill, n - shares[i])
            shares[i] += extra
            spill -= extra
        return shares

    def sample(self, count: int, *, seed: int = 0) -> list[Any]:
        """Each member samples its share with its own seed; the result is shuffled with ``seed``
        so any prefix mixes the families."""
        found = []
        for i, (member, share) in enumerate(zip(self.members, self.counts(count))):
            found += member.sample(share, seed=seed * 1000 + i)
        random.Random(seed).shuffle(found)
        return found

    def validate(self, arch: Any) -> Any:
        return self.member(arch).validate(arch)

    def architecture_from_dict(self, data: Mapping[str, Any]) -> Any:
        family = data.get("family", "resnet_flex")
        for m in self.members:
            if _family(m) == family:
                return m.architecture_from_dict(data)
        raise ValueError(f"space {self.name!r} has no {family!r} member")

    def blocks(self, arch: Any) -> list[Any]:
        raise ValueError(no_lookup_table("union"))

    def distinct_blocks(self) -> list[Any]:
        raise ValueError(no_lookup_table("union"))

    def model_spec(self, arch: Any) -> dict[str, Any]:
        return self.member(arch).model_spec(arch)

    def build_model(self, arch: Any) -> nn.Module:
        return self.member(arch).build_model(arch)
