"""Tests for training.data: the embedded data sets, the splits, the config and CIFAR on disk."""

from __future__ import annotations

import os
import pickle
import random
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100, cifar

from serving.manifest import Task
from training import data
from training.data import DATASETS, BuiltinData, Dataset, RawDataset, load_dataset
from training.errors import DataError
from training.splits import TensorSplit

# name: (input_shape, number of classes, builder options that keep the test fast)
EMBEDDED: dict[str, tuple[tuple[int, ...], int, dict[str, Any]]] = {
    "digits": ((1, 8, 8), 10, {}),
    "mnist1d": ((1, 40), 10, {"n_samples": 300}),
    "two_spirals": ((2,), 2, {}),
    "regression1d": ((1,), 0, {}),
}
ON_DISK = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _load(name: str, **overrides: Any) -> Dataset:
    return load_dataset(BuiltinData(name=name, options=EMBEDDED[name][2], **overrides))


def _splits(dataset: Dataset) -> dict[str, TensorSplit]:
    return {
        "train": dataset.train,
        "val": dataset.val,
        "calibration": dataset.calibration,
        "test": dataset.test,
    }


def _rows(*splits: TensorSplit) -> list[tuple[float, ...]]:
    """The samples of ``splits`` as sorted (inputs..., target) rows: a multiset to compare."""
    rows = [torch.cat([s.x.flatten(1), s.y[:, None].to(torch.float32)], dim=1) for s in splits]
    return sorted(map(tuple, torch.cat(rows).tolist()))


def test_every_registered_data_set_is_tested() -> None:
    assert set(DATASETS) == set(EMBEDDED) | set(ON_DISK)


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_data_set_shapes_and_dtypes(name: str) -> None:
    input_shape, num_classes, _ = EMBEDDED[name]
    dataset = _load(name)
    assert dataset.name == name
    assert dataset.input_shape == input_shape
    assert len(dataset.class_names) == num_classes
    assert dataset.task is (Task.CLASSIFICATION if num_classes else Task.REGRESSION)
    target_dtype = torch.int64 if num_classes else torch.float32
    for split in _splits(dataset).values():
        assert len(split) > 0
        assert split.x.shape == (len(split), *input_shape)
        assert split.x.dtype == torch.float32 and split.y.dtype == target_dtype
        assert torch.isfinite(split.x).all() and torch.isfinite(split.y.float()).all()
        if num_classes:
            assert set(split.y.unique().tolist()) == set(range(num_classes))


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_val_and_calibration_partition_train(name: str) -> None:
    config = BuiltinData(name=name, options=EMBEDDED[name][2], val_fraction=0.2)
    dataset = load_dataset(config)
    raw = config.read()
    n = len(raw.train)
    assert [len(dataset.val), len(dataset.calibration)] == pytest.approx([0.2 * n, 0.1 * n], abs=1)
    assert _rows(dataset.train, dataset.val, dataset.calibration) == _rows(raw.train)
    assert _rows(dataset.test) == _rows(raw.test)


@pytest.mark.parametrize("name", ["digits", "two_spirals"])
def test_held_out_splits_are_stratified(name: str) -> None:
    dataset = _load(name)
    expected = torch.bincount(dataset.train.y) / len(dataset.train)
    for split in (dataset.val, dataset.calibration):
        counts = torch.bincount(split.y, minlength=len(expected))
        assert (counts - expected * len(split)).abs().max() <= 1


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_loading_is_deterministic_and_follows_the_seed(name: str) -> None:
    first, again, other = _load(name), _load(name), _load(name, seed=1)
    for split_name, split in _splits(first).items():
        assert torch.equal(split.x, _splits(again)[split_name].x)
        assert torch.equal(split.y, _splits(again)[split_name].y)
    assert first.mean == again.mean and first.std == again.std
    assert not torch.equal(first.val.x, other.val.x)


def test_fixed_benchmark_test_split_ignores_the_seed() -> None:
    assert torch.equal(_load("digits").test.x, _load("digits", seed=3).test.x)


def test_mean_and_std_per_channel_for_images() -> None:
    dataset = _load("digits")
    assert len(dataset.mean) == len(dataset.std) == dataset.input_shape[0] == 1
    assert dataset.mean[0] == pytest.approx(dataset.train.x.mean().item(), rel=1e-5)
    assert dataset.std[0] == pytest.approx(dataset.train.x.std(correction=0).item(), rel=1e-5)


def test_mean_and_std_per_feature_for_vectors() -> None:
    dataset = _load("two_spirals")
    x = dataset.train.x
    assert len(dataset.mean) == len(dataset.std) == 2
    assert dataset.mean == pytest.approx(x.mean(0).tolist(), rel=1e-5)
    assert dataset.std == pytest.approx(x.std(0, correction=0).tolist(), rel=1e-5)


def test_std_is_floored(monkeypatch: pytest.MonkeyPatch) -> None:
    def constant(config: BuiltinData) -> RawDataset:
        split = TensorSplit(torch.ones(40, 3, 5), torch.arange(40) % 2)
        return RawDataset(Task.CLASSIFICATION, ("a", "b"), train=split, test=split)

    monkeypatch.setattr(data, "DATASETS", {})
    data.register_dataset(constant)
    dataset = load_dataset(BuiltinData(name="constant"))
    assert dataset.mean == (1.0, 1.0, 1.0)
    assert dataset.std == (1e-6, 1e-6, 1e-6)


def test_mnist1d_default_size_and_classes() -> None:
    dataset = load_dataset(BuiltinData(name="mnist1d"))
    assert len(dataset.train) + len(dataset.val) + len(dataset.calibration) == 4000
    assert len(dataset.test) == 1000
    assert dataset.class_names == tuple(str(digit) for digit in range(10))


def test_mnist1d_generation_has_no_side_effects(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.chdir(tmp_path)  # mnist1d's own caching helper would write here
    random.seed(7)
    np.random.seed(7)
    dataset = load_dataset(BuiltinData(name="mnist1d", options={"n_samples": 200}))
    assert len(dataset.test) == 40
    assert list(tmp_path.iterdir()) == []
    # mnist1d reseeds the global generators; the loader puts them back.
    assert random.random() == random.Random(7).random()
    assert np.random.random() == np.random.RandomState(7).random()


def test_regression1d_inputs_lie_in_three_clusters() -> None:
    dataset = load_dataset(BuiltinData(name="regression1d", options={"noise": 0.0}))
    x = torch.cat([split.x for split in _splits(dataset).values()]).squeeze(1)
    in_cluster = (x.abs() <= 1.2) | ((x.abs() >= 4.8) & (x.abs() <= 7.2))
    assert in_cluster.all()
    assert dataset.class_names == ()
    torch.testing.assert_close(
        dataset.test.y, torch.sin(dataset.test.x[:, 0]) + 0.1 * dataset.test.x[:, 0]
    )


def test_generated_sizes_follow_options() -> None:
    dataset = load_dataset(BuiltinData(name="two_spirals", options={"n_samples": 500}))
    assert sum(len(split) for split in _splits(dataset).values()) == 500
    assert len(dataset.test) == 100
    assert dataset.class_names == ("arm 0", "arm 1")


@pytest.mark.parametrize(
    ("fields", "field", "match"),
    [
        ({"name": "imagenet"}, "name", "known: digits, mnist1d"),
        ({"val_fraction": 0.0}, "val_fraction", "greater than 0"),
        ({"calibration_fraction": 0.5}, "calibration_fraction", "less than 0.5"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        (
            {"name": "digits", "options": {"noise": 0.1}},
            "options",
            r"unknown option\(s\) \['noise'\]",
        ),
        ({"shuffle": True}, "shuffle", "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, Any], field: str, match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match) as info:
        BuiltinData(**fields)
    assert [error["loc"] for error in info.value.errors()] == [(field,)]


def _write_fake_cifar(root: Path, dataset_class: type[CIFAR10], per_class: int) -> list[str]:
    """Write a tiny data set in torchvision's CIFAR layout (pickled dicts of uint8 rows).

    Channel 0 counts along the pixels, channel 1 is 255 and channel 2 holds the label.
    """
    folder = root / dataset_class.base_folder
    folder.mkdir()
    num_classes = 10 if dataset_class is CIFAR10 else 100
    label_key = "labels" if dataset_class is CIFAR10 else "fine_labels"

    def write(filename: str, payload: dict[str, Any]) -> None:
        with open(folder / filename, "wb") as file:
            pickle.dump(payload, file)

    def batch(n: int) -> dict[str, Any]:
        labels = [i % num_classes for i in range(n)]
        images = np.empty((n, 3, 32 * 32), dtype=np.uint8)
        images[:, 0] = np.arange(32 * 32) % 256
        images[:, 1] = 255
        images[:, 2] = np.array(labels)[:, None]
        return {"data": images.reshape(n, -1), label_key: labels}

    for filename, _ in dataset_class.train_list:
        write(filename, batch(num_classes * per_class // len(dataset_class.train_list)))
    for filename, _ in dataset_class.test_list:
        write(filename, batch(num_classes))
    class_names = [f"class {i}" for i in range(num_classes)]
    write(dataset_class.meta["filename"], {dataset_class.meta["key"]: class_names})
    return class_names


@pytest.mark.parametrize("name", sorted(ON_DISK))
def test_cifar_from_a_fake_folder(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake files cannot match torchvision's md5 sums (data and meta): check existence only.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    class_names = _write_fake_cifar(tmp_path, ON_DISK[name], per_class=10)
    dataset = load_dataset(BuiltinData(name=name, root=tmp_path))
    assert dataset.class_names == tuple(class_names)
    assert dataset.input_shape == (3, 32, 32)
    assert len(dataset.train) + len(dataset.val) + len(dataset.calibration) == 10 * len(class_names)
    assert len(dataset.test) == len(class_names)
    pixel_count = (torch.arange(32 * 32) % 256).reshape(32, 32) / 255
    for split in _splits(dataset).values():
        assert split.x.dtype == torch.float32 and split.x.is_contiguous()
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
        torch.testing.assert_close(split.x[:, 0], pixel_count.expand(len(split), 32, 32))
        assert (split.x[:, 1] == 1.0).all()
        torch.testing.assert_close(split.x[:, 2, 0, 0] * 255, split.y.to(torch.float32))
    assert len(dataset.mean) == len(dataset.std) == 3
    assert dataset.mean[1] == pytest.approx(1.0) and dataset.std[1] == 1e-6


@pytest.mark.parametrize("name", sorted(ON_DISK))
def test_cifar_missing_folder_without_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.download=true"):
        load_dataset(BuiltinData(name=name, root=tmp_path, download=False))


def test_cifar_needs_a_root() -> None:
    with pytest.raises(DataError, match=r"set data\.root"):
        load_dataset(BuiltinData(name="cifar10"))
