"""What one sample of a model's input is, so data-free methods can make inputs without data.

An :class:`InputSpec` is float features of a fixed shape (images, sequences, vectors: data-free
samples are N(0, 1), which matches slimline's standardised datasets), or int64 **token ids**
``(seq_len,)`` with the ids a tokenizer really produces (data-free samples are uniform over
them, framed ``[CLS] ... [SEP]`` when the tokenizer has those: random *floats* fed to an
embedding are an index error, and never-trained ids such as BERT's ``[unused]`` rows would make
a synthetic batch unlike any real input). Datasets and artifacts carry one; the pruners and
quantizers ask it for synthetic batches (:meth:`InputSpec.random`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["InputSpec", "token_spec_from_tokenizer"]


@dataclass(frozen=True)
class InputSpec:
    """One sample's shape and kind. For ``int64`` token ids, ``id_ranges`` are the half-open
    ``[low, high)`` ranges synthetic ids are drawn from, ``cls_id``/``sep_id`` frame each row and
    ``pad_id`` marks padding (what a model derives its attention mask from)."""

    shape: tuple[int, ...]
    dtype: Literal["float32", "int64"] = "float32"
    id_ranges: tuple[tuple[int, int], ...] = ()
    cls_id: int | None = None
    sep_id: int | None = None
    pad_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "id_ranges", tuple((int(a), int(b)) for a, b in self.id_ranges))
        if self.dtype not in ("float32", "int64"):
            raise ValueError(f"input dtype must be float32 or int64, got {self.dtype!r}")
        if self.dtype == "int64":
            if len(self.shape) != 1:
                raise ValueError(f"token inputs are (seq_len,) per sample, got {self.shape}")
            if not self.id_ranges or any(b <= a for a, b in self.id_ranges):
                raise ValueError("token inputs need non-empty id_ranges [(low, high), ...]")

    @property
    def is_tokens(self) -> bool:
        return self.dtype == "int64"

    @classmethod
    def of(cls, example: torch.Tensor) -> InputSpec:
        """The float spec of ``example``'s sample shape (integer examples need a tokenizer's
        spec: their valid ids are unknown here)."""
        if example.dtype.is_floating_point:
            return cls(tuple(example.shape[1:]))
        high = int(example.max()) + 1 if example.numel() else 1
        return cls(tuple(example.shape[1:]), "int64", ((0, max(high, 1)),))

    def random(self, samples: int, *, seed: int = 0, seq_len: int | None = None) -> torch.Tensor:
        """``samples`` synthetic inputs from a fixed seed (see the module docstring)."""
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        generator = torch.Generator().manual_seed(seed)
        if not self.is_tokens:
            return torch.randn((samples, *self.shape), generator=generator)
        length = seq_len or self.shape[0]
        sizes = torch.tensor([b - a for a, b in self.id_ranges])
        offsets = torch.cumsum(sizes, 0) - sizes
        draws = torch.randint(int(sizes.sum()), (samples, length), generator=generator)
        # map a draw in [0, total) into the union of the ranges
        which = torch.searchsorted(torch.cumsum(sizes, 0), draws, right=True)
        lows = torch.tensor([a for a, _ in self.id_ranges])
        ids = lows[which] + draws - offsets[which]
        if self.cls_id is not None and length >= 2:
            ids[:, 0] = self.cls_id
        if self.sep_id is not None and length >= 2:
            ids[:, -1] = self.sep_id
        return ids.to(torch.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype,
                "id_ranges": [list(r) for r in self.id_ranges], "cls_id": self.cls_id,
                "sep_id": self.sep_id, "pad_id": self.pad_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(shape=tuple(data["shape"]), dtype=data.get("dtype", "float32"),
                   id_ranges=tuple(tuple(r) for r in data.get("id_ranges") or ()),
                   cls_id=data.get("cls_id"), sep_id=data.get("sep_id"),
                   pad_id=data.get("pad_id"))


def _ranges(ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Sorted ids as half-open runs: [1, 2, 3, 7] -> ((1, 4), (7, 8))."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((a, b) for a, b in runs)


def token_spec_from_tokenizer(tokenizer: Any, seq_len: int) -> InputSpec:
    """The token spec of a Hugging Face tokenizer: every id except special tokens and the
    never-trained ``[unusedN]`` / ``<unusedN>`` placeholders."""
    import re

    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unused = {i for token, i in vocab.items() if re.fullmatch(r"[\[<]unused\d+[\]>]", token)}
    valid = [i for i in range(len(tokenizer)) if i not in special and i not in unused]
    if not valid:
        raise ValueError("the tokenizer has no ordinary tokens to sample from")
    return InputSpec((seq_len,), "int64", _ranges(valid),
                     cls_id=getattr(tokenizer, "cls_token_id", None),
                     sep_id=getattr(tokenizer, "sep_token_id", None),
                     pad_id=getattr(tokenizer, "pad_token_id", None))
