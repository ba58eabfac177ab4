"""Dataset registry: small real datasets that need no download, with deterministic splits.

* ``digits``  — scikit-learn's 8x8 handwritten digits (1,797 images, shipped with sklearn).
* ``mnist1d`` — MNIST-1D sequences generated offline by ``mnist1d.data.make_dataset``
  (never its download), shape ``(N, 1, 40)``.
* ``text``    — lines of a local text file tokenized with a local tokenizer
  (:mod:`slimline.text_data`): int64 token ids, with labels (``label<TAB>text``) or without
  (an embedding task).
* a custom dataset: ``factory: package.module:function`` returning tensors (opt-in: runs code).

Numeric inputs are float32, standardised with training-split statistics; labels are int64.
Each dataset has an :class:`~slimline.inputs.InputSpec` (what a synthetic sample looks like, for
data-free methods) and a ``task``: ``classification``, or ``embedding`` (no labels: models are
compared by their outputs, not scored against classes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimline.inputs import InputSpec
from slimline.io import atomic_path, canonical_json, sha256_text
from slimline.registry import Registry, first_doc_line, import_object

DatasetBuilder = Callable[..., "Dataset"]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")
SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Train/val/test tensors plus what a model builder needs to know about them."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = "classification"  # or "embedding": no labels, outputs compared to the parent's
    spec: InputSpec | None = None  # default: float inputs of x_train's sample shape

    @property
    def input_spec(self) -> InputSpec:
        return self.spec if self.spec is not None else InputSpec.of(self.x_train[:1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> tuple[int, ...]:
        return self.input_shape[1:]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.split(split)
        order = (
            torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            if shuffle
            else torch.arange(len(x))
        )
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]

    def calibration(self, num_samples: int = 128, *, seed: int = 0) -> torch.Tensor:
        """A fixed random subset of the training inputs (for calibration-based methods)."""
        count = min(num_samples, len(self.x_train))
        index = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        return self.x_train[index[:count]]

    def fingerprint(self) -> str:
        """Content hash of all splits: part of every stage's cache key."""
        digest = sha256_text(self.name)
        for split in SPLITS:
            x, y = self.split(split)
            digest = sha256_text(digest + _tensor_hash(x) + _tensor_hash(y))
        return digest


def _tensor_hash(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def describe_datasets() -> list[tuple[str, str]]:
    return [(name, first_doc_line(DATASETS.get(name))) for name in DATASETS.names()]


def load_dataset(name: str | None = None, *, factory: str | None = None, **kwargs) -> Dataset:
    """Load a registered dataset by name, or a custom one from ``package.module:function``."""
    if factory is not None:
        return _from_factory(factory, **kwargs)
    if name is None:
        raise ValueError("a dataset needs a 'name' (registered) or a 'factory'")
    return DATASETS.get(name)(**kwargs)


def split_indices(
    num_samples: int, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, ...]:
    """Deterministic shuffled train/val/test index split."""
    order = np.random.default_rng(seed).permutation(num_samples)
    n_train = int(round(fractions[0] * num_samples))
    n_val = int(round(fractions[1] * num_samples))
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def _standardised(name: str, x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> Dataset:
    mean, std = float(x["train"].mean()), float(x["train"].std()) or 1.0
    tensors = {}
    for split in SPLITS:
        tensors[f"x_{split}"] = torch.from_numpy(((x[split] - mean) / std).astype(np.float32))
        tensors[f"y_{split}"] = torch.from_numpy(y[split].astype(np.int64))
    num_classes = int(max(int(v.max()) for v in y.values() if v.size)) + 1
    return Dataset(name=name, num_classes=num_classes, **tensors)


@register_dataset("digits")
def digits(
    *, resize: int | list[int] | None = None, split_seed: int = 0, val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """scikit-learn handwritten digits, 8x8 grey images (1,797), optional bilinear resize."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 16.0
    if resize is not None:
        size = [resize, resize] if isinstance(resize, int) else list(resize)
        images = F.interpolate(
            torch.from_numpy(images), size=size, mode="bilinear", align_corners=False
        ).numpy()
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    parts = split_indices(len(images), fractions, split_seed)
    x = {split: images[idx] for split, idx in zip(SPLITS, parts)}
    y = {split: bunch.target[idx] for split, idx in zip(SPLITS, parts)}
    return _standardised("digits", x, y)


def cache_dir() -> Path:
    """Where generated data and reference models are cached (``$SLIMLINE_CACHE`` to override)."""
    root = os.environ.get("SLIMLINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimline"
    )
    return Path(root)


@register_dataset("mnist1d")
def mnist1d(
    *, num_samples: int = 5000, seed: int = 42, split_seed: int = 0, val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """MNIST-1D sequences (N, 1, 40), generated offline with mnist1d's make_dataset."""
    params = {"num_samples": num_samples, "seed": seed}
    path = cache_dir() / "data" / f"mnist1d-{sha256_text(canonical_json(params))[:16]}.npz"
    if path.exists():
        with np.load(path) as stored:
            x_all, y_all = stored["x"], stored["y"]
    else:
        x_all, y_all = _generate_mnist1d(num_samples, seed)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, x=x_all, y=y_all)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    parts = split_indices(len(x_all), fractions, split_seed)
    x = {split: x_all[idx][:, None, :] for split, idx in zip(SPLITS, parts)}
    y = {split: y_all[idx] for split, idx in zip(SPLITS, parts)}
    return _standardised("mnist1d", x, y)


def _generate_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, get_templates, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # make_dataset only downloads when asked to; pass the built-in templates explicitly anyway.
    data = make_dataset(args, template=get_templates())
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def _from_factory(reference: str, **kwargs) -> Dataset:
    produced = import_object(reference)(**kwargs)  # type: ignore[operator]
    if isinstance(produced, Dataset):
        return produced
    if isinstance(produced, dict) and {"x_train", "y_train", "x_test", "y_test"} <= set(produced):
        x = {s: _as_numpy(produced.get(f"x_{s}")) for s in SPLITS}
        y = {s: _as_numpy(produced.get(f"y_{s}")) for s in SPLITS}
        if x["val"] is None:  # carve a validation split out of train
            train, val, _ = split_indices(len(x["train"]), (0.9, 0.1, 0.0), 0)
            x["val"], y["val"] = x["train"][val], y["train"][val]
            x["train"], y["train"] = x["train"][train], y["train"][train]
    elif isinstance(produced, (tuple, list)) and len(produced) == 2:
        x_all, y_all = _as_numpy(produced[0]), _as_numpy(produced[1])
        parts = split_indices(len(x_all), (0.7, 0.1, 0.2), 0)
        x = {split: x_all[idx] for split, idx in zip(SPLITS, parts)}
        y = {split: y_all[idx] for split, idx in zip(SPLITS, parts)}
    else:
        raise ValueError(
            f"dataset factory {reference!r} must return a slimline Dataset, an (x, y) pair, or a "
            "dict with x_train, y_train, x_test, y_test (x_val, y_val optional)"
        )
    if x["train"].ndim < 2:
        raise ValueError(f"dataset factory {reference!r}: inputs need shape (N, C, ...)")
    return _standardised(reference, x, y)


def _as_numpy(value) -> np.ndarray | None:
    if value is None:
        return None
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# Importing registers the datasets defined elsewhere.
from slimline import text_data  # noqa: E402,F401
