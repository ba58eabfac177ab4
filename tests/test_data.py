"""Datasets load deterministically, split cleanly and standardise with training statistics."""

from __future__ import annotations

import pytest
import torch

from slimline.data import list_datasets, load_dataset
from slimline.registry import UnknownNameError


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_dataset_is_deterministic_and_disjoint(name: str) -> None:
    kwargs = {"num_samples": 1000} if name == "mnist1d" else {}
    a, b = load_dataset(name, **kwargs), load_dataset(name, **kwargs)
    assert a.fingerprint() == b.fingerprint()
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split)[0], b.split(split)[0])
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.num_classes == 10
    total = len(a.x_train) + len(a.x_val) + len(a.x_test)
    assert len(a.x_test) == pytest.approx(0.2 * total, abs=2)
    # No sample appears in two splits (rows compared exactly).
    train_rows = {tuple(row.flatten().tolist()) for row in a.x_train}
    assert not any(tuple(row.flatten().tolist()) in train_rows for row in a.x_test)
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-2


def test_split_seed_changes_split() -> None:
    a, b = load_dataset("digits"), load_dataset("digits", split_seed=1)
    assert a.fingerprint() != b.fingerprint()


def test_shapes() -> None:
    assert load_dataset("digits").input_shape == (1, 8, 8)
    assert load_dataset("digits", resize=16).input_shape == (1, 16, 16)
    assert load_dataset("mnist1d", num_samples=500).input_shape == (1, 40)


def test_mnist1d_is_generated_not_downloaded(monkeypatch) -> None:
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    monkeypatch.setattr(mnist1d.data, "from_pickle", no_download, raising=False)
    data = load_dataset("mnist1d", num_samples=600, seed=7)
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 600


def test_calibration_subset_is_fixed_and_from_train() -> None:
    data = load_dataset("digits")
    a, b = data.calibration(32, seed=3), data.calibration(32, seed=3)
    assert torch.equal(a, b) and a.shape == (32, 1, 8, 8)
    assert not torch.equal(a, data.calibration(32, seed=4))


def test_custom_factory_dataset() -> None:
    data = load_dataset(factory="tests.factories:xy_dataset", n=200)
    assert data.input_shape == (3, 5) and len(data.x_train) == 140
    with pytest.raises(ValueError, match="must return"):
        load_dataset(factory="tests.factories:bad_dataset")


def test_unknown_dataset_lists_known() -> None:
    with pytest.raises(UnknownNameError, match="digits"):
        load_dataset("digit")
    assert {"digits", "mnist1d"} <= set(list_datasets())
