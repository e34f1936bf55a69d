"""Tests for the user's own data: arrays, tables, image folders and code, each read through
``load_dataset`` from files written here, each refusal one line; and training on them."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchvision.io import ImageReadMode, decode_image, write_png

from serving.bundle import load_bundle
from serving.manifest import ImageSpec, InputSpec, Task
from training.augment import AugmentConfig
from training.batchnorm import recompute_batchnorm
from training.config import load_config, parse_config
from training.data import Dataset, DataSource, load_dataset
from training.errors import ConfigError, DataError
from training.espro import TrainedSimplex, draw_members, mode_digest
from training.pipeline import train
from training.splits import StreamedSplit, TensorSplit, TrainingData
from training.spro import OptimSettings, SimplexTrainer

# torchvision 0.29 deprecates its image codecs (for TorchCodec); the trainer still reads with them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

CLASSES = ("cat", "dog", "owl")


def _source(data: dict[str, Any]) -> DataSource:
    """A data section validated as ``espro train`` validates it."""
    return parse_config({"data": data}).data


def _load(**data: Any) -> Dataset:
    return load_dataset(_source(data))


def _rows(*splits: Any) -> list[tuple[float, ...]]:
    """The samples of in-memory splits as sorted (inputs..., target) rows: a multiset."""
    rows = [torch.cat([s.x.flatten(1), s.y[:, None].to(torch.float32)], dim=1) for s in splits]
    return sorted(map(tuple, torch.cat(rows).tolist()))


def _refusal(source: dict[str, Any], match: str) -> str:
    """The one-line DataError that loading ``source`` raises; it must match ``match``."""
    with pytest.raises(DataError, match=match) as info:
        _load(**source)
    message = str(info.value)
    assert "\n" not in message
    return message


def _arrays(n: int = 60, features: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)).astype(np.float32), np.arange(n) % len(CLASSES)


def _images(root: Path, per_class: int, *, splits: tuple[str, ...] = ("train",)) -> None:
    """Tiny PNGs ``root/<split>/<class>/<i>.png``, each class a different brightness."""
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                image = torch.randint(0, 90, (3, 6, 7), generator=g, dtype=torch.uint8) + 80 * c
                write_png(image, str(root / split / name / f"{i}.png"))


IMAGE_TRAINING = {
    "name": "pets",
    "seed": 1,
    "model": {"architecture": "cnn", "kwargs": {"channels": [4, 8], "hidden": 8}},
    "modes": {"count": 1, "epochs": 2, "lr": 0.05, "batch_size": 8},
    "simplex": {"vertices": 1, "epochs": 1, "lr": 0.02, "samples": 2, "lambda": 0.1},
    "draws": {"per_simplex": 2},
    "evaluation": {"noise_severities": [0.5]},
}
"""A config that trains a tiny CNN on a tiny image folder in a second or two."""


# --------------------------------------------------------------------------- config


def test_a_section_without_source_is_a_builtin_data_set() -> None:
    assert _source({"name": "digits"}).source == "builtin"
    assert _source({"source": "builtin", "name": "digits"}).source == "builtin"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "csv"}, "data: Input tag 'csv'"),
        ({"source": "table", "path": "t.csv"}, "data.label: Field required"),
        ({"source": "image_folder", "root": "r", "size": [0, 8]}, "data.size.0:"),
        ({"source": "image_folder", "root": "r"}, "data.size: Field required"),
        ({"source": "arrays", "path": "a.npz", "tasks": "x"}, "data.tasks: Extra inputs"),
        ({"source": "module", "factory": "pkg.data:load"}, "data.allow_custom: true"),
        ({"source": "table", "path": "t", "label": "y", "features": ["y"]}, "cannot be a feature"),
        ({"source": "arrays", "path": "a", "augment": {"crop_padding": -1}}, "crop_padding"),
    ],
)
def test_source_fields_are_validated_by_name(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"data": data}, "my.yaml")


# --------------------------------------------------------------------------- arrays


def test_arrays_from_a_npz_round_trip(tmp_path: Path) -> None:
    x, y = _arrays()
    x_test, y_test = _arrays(n=9, seed=1)
    names = np.array(["a", "b", "c"])
    np.savez(
        tmp_path / "d.npz", x_train=x, y_train=y, x_test=x_test, y_test=y_test, class_names=names
    )
    dataset = _load(source="arrays", path=str(tmp_path / "d.npz"))
    assert dataset.task is Task.CLASSIFICATION and dataset.class_names == ("a", "b", "c")
    assert dataset.input_shape == (3,) and dataset.name == str(tmp_path / "d.npz")
    assert _rows(dataset.train, dataset.val, dataset.calibration) == _rows(
        TensorSplit(torch.from_numpy(x), torch.from_numpy(y))
    )
    torch.testing.assert_close(dataset.test.x, torch.from_numpy(x_test))
    assert dataset.test.y.dtype == torch.int64


def test_arrays_from_npy_files_for_regression_hold_out_a_seeded_test_split(tmp_path: Path) -> None:
    x, _ = _arrays(n=50)
    np.save(tmp_path / "x_train.npy", x)
    np.save(tmp_path / "y_train.npy", x.sum(axis=1).astype(np.float64))
    source = {"source": "arrays", "path": str(tmp_path), "task": "regression"}
    dataset, again, other = _load(**source), _load(**source), _load(**source, seed=5)
    assert dataset.task is Task.REGRESSION and dataset.class_names == ()
    assert len(dataset.test) == 10 and dataset.test.y.dtype == torch.float32
    assert torch.equal(dataset.test.x, again.test.x) and not torch.equal(
        dataset.test.x, other.test.x
    )
    every = _rows(dataset.train, dataset.val, dataset.calibration, dataset.test)
    assert every == _rows(TensorSplit(torch.from_numpy(x), torch.from_numpy(x.sum(axis=1))))


def test_string_labels_name_the_classes_in_sorted_order(tmp_path: Path) -> None:
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array(CLASSES[::-1])[y])
    dataset = _load(source="arrays", path=str(tmp_path / "d.npz"))
    assert dataset.class_names == CLASSES
    assert sorted(torch.cat([dataset.train.y, dataset.test.y]).unique().tolist()) == [0, 1, 2]


def _npz(path: Path, **arrays: Any) -> dict[str, str]:
    x, y = _arrays()
    np.savez(path / "d.npz", **({"x_train": x, "y_train": y} | arrays))
    return {"source": "arrays", "path": str(path / "d.npz")}


def test_arrays_refusals_name_the_file_and_the_problem(tmp_path: Path) -> None:
    x, y = _arrays()
    nan = x.copy()
    nan[7, 1] = np.nan
    ragged = np.array([[1.0, 2.0], [3.0]], dtype=object)
    cases = {
        "no y_train": ({"y_train": None}, r"d\.npz: no y_train array"),
        "objects": ({"x_train": ragged}, r"d\.npz\[x_train\]: holds Python objects"),
        "lengths": ({"y_train": y[:-1]}, r"y_train\]: shape \[59\]; expected \[60\]"),
        "nan": ({"x_train": nan}, r"x_train\]: row 7 holds NaN"),
        "strings as inputs": ({"x_train": x.astype(str)}, r"x_train\]: inputs have dtype <U"),
        "float labels": ({"y_train": y.astype(float)}, r"labels have dtype float64.*regression"),
        "empty class": ({"class_names": np.array(["a", "b", "c", "d"])}, r"\['d'\] have no"),
        "unknown array": ({"x_val": x}, r"unknown arrays \['x_val'\]"),
        "test shape": ({"x_test": x[:, :2], "y_test": y}, r"x_test\]: rows of shape \[2\]"),
        "test alone": ({"x_test": x}, "x_test and y_test go together"),
        "test label": ({"x_test": x, "y_test": y + 1}, r"y_test\], row 2: label 3 is not a class"),
    }
    for name, (arrays, match) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        x_train = arrays.pop("x_train", x)
        y_train = arrays.pop("y_train", y)
        saved = {"x_train": x_train} | ({"y_train": y_train} if y_train is not None else {})
        np.savez(folder / "d.npz", **saved, **arrays)
        assert str(folder) in _refusal({"source": "arrays", "path": str(folder / "d.npz")}, match)
    _refusal({"source": "arrays", "path": str(tmp_path / "none.npz")}, "no such file")
    np.save(tmp_path / "one.npy", x)
    _refusal({"source": "arrays", "path": str(tmp_path / "one.npy")}, "a single array")


# --------------------------------------------------------------------------- table


def _csv(path: Path, header: str, *rows: str) -> str:
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def test_a_csv_table_with_string_labels_and_a_test_table(tmp_path: Path) -> None:
    rows = [f"{i % 3 * 0.5},{name},{i},x{i}" for i, name in enumerate(CLASSES * 10)]
    train = _csv(tmp_path / "train.csv", "b,species,a,note", *rows)
    test = _csv(tmp_path / "test.csv", "a,b,species,note", "1,2,owl,-", "3,4,cat,-")
    dataset = _load(
        source="table", path=train, test_path=test, label="species", features=["a", "b"]
    )
    assert dataset.class_names == CLASSES and dataset.input_shape == (2,)
    torch.testing.assert_close(dataset.test.x, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert dataset.test.y.tolist() == [2, 0]
    assert len(dataset.train) + len(dataset.val) + len(dataset.calibration) == 30


def test_a_csv_table_for_regression_with_every_other_column_a_feature(tmp_path: Path) -> None:
    rows = [f"{i},{2 * i + 1},{i * i}" for i in range(40)]
    dataset = _load(
        source="table", path=_csv(tmp_path / "t.csv", "a,y,b", *rows), label="y", task="regression"
    )
    assert (
        dataset.task is Task.REGRESSION and dataset.input_shape == (2,) and len(dataset.test) == 8
    )
    for split in (dataset.train, dataset.test):
        torch.testing.assert_close(split.y, 2 * split.x[:, 0] + 1)
        torch.testing.assert_close(split.x[:, 1], split.x[:, 0] ** 2)


@pytest.mark.parametrize(
    ("label", "rows", "match"),
    [
        ("label", ["1,2,a", "3,4,b"], r"t\.csv: no column 'label'; columns: f, g, y"),
        ("y", ["1,nan,a", "3,4,b"], r"t\.csv, line 2, column 'g': 'nan' is not a finite number"),
        ("y", ["1,2,a", "3,four,b"], r"t\.csv, line 3, column 'g': 'four' is not a number"),
        ("y", ["1,,a", "3,4,b"], r"t\.csv, line 2, column 'g': the value is missing"),
        ("y", ["1,2,a", "3,4"], r"t\.csv, line 3: 2 fields; the header has 3"),
    ],
)
def test_table_refusals_name_the_file_the_line_and_the_column(
    tmp_path: Path, label: str, rows: list[str], match: str
) -> None:
    path = _csv(tmp_path / "t.csv", "f,g,y", *rows)
    _refusal({"source": "table", "path": path, "label": label}, match)


def test_table_refusals_of_labels_and_formats(tmp_path: Path) -> None:
    train = _csv(tmp_path / "t.csv", "f,y", *[f"{i},{'ab'[i % 2]}" for i in range(20)])
    test = _csv(tmp_path / "u.csv", "f,y", "1,a", "2,c")
    source = {"source": "table", "path": train, "label": "y"}
    _refusal(source | {"test_path": test}, r"u\.csv, column 'y', line 3: label 'c' is not a class")
    _refusal(source | {"task": "regression"}, r"t\.csv, line 2, column 'y': 'a' is not a number")
    _refusal(source | {"path": str(tmp_path / "t.parquet")}, "save the table as CSV")
    _refusal(source | {"path": str(tmp_path / "missing.csv")}, "missing.csv: cannot read")


# --------------------------------------------------------------------------- image folder


def test_an_image_folder_round_trips_streamed(tmp_path: Path) -> None:
    _images(tmp_path, per_class=10, splits=("train", "test"))
    dataset = _load(source="image_folder", root=str(tmp_path), size=[4, 5], num_workers=0)
    assert dataset.class_names == CLASSES and dataset.input_shape == (3, 4, 5)
    assert isinstance(dataset.train, StreamedSplit) and isinstance(dataset.test, StreamedSplit)
    assert len(dataset.train) + len(dataset.val) + len(dataset.calibration) == 30
    assert dataset.test.y.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    first = decode_image(str(tmp_path / "test" / "cat" / "0.png")).float()[None] / 255
    resized = nn.functional.interpolate(first, size=(4, 5), mode="bilinear", antialias=True)
    torch.testing.assert_close(next(dataset.test.chunks())[:1], resized)
    # Normalisation statistics are those of the training rows, read once while loading.
    train = torch.cat(list(dataset.train.chunks()))
    assert dataset.mean == pytest.approx(train.mean(dim=(0, 2, 3)).tolist(), rel=1e-5)
    assert dataset.std == pytest.approx(train.std(dim=(0, 2, 3), correction=0).tolist(), rel=1e-4)


def test_grayscale_in_memory_and_a_held_out_test_split(tmp_path: Path) -> None:
    _images(tmp_path, per_class=20)
    source = {"source": "image_folder", "root": str(tmp_path), "size": [6, 7], "color": "grayscale"}
    dataset = _load(**source, in_memory=True, num_workers=1)
    assert dataset.input_shape == (1, 6, 7) and isinstance(dataset.train, TensorSplit)
    assert (
        len(dataset.test) == 12 and sorted(dataset.test.y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    )
    gray = decode_image(str(tmp_path / "train" / "cat" / "0.png"), mode=ImageReadMode.GRAY)
    every = torch.cat([dataset.train.x, dataset.val.x, dataset.calibration.x, dataset.test.x])
    assert any(torch.equal(row, gray.float() / 255) for row in every)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_unreadable_image_is_refused_in_one_line(tmp_path: Path, num_workers: int) -> None:
    _images(tmp_path, per_class=3)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    source = {"source": "image_folder", "root": str(tmp_path), "size": [4, 4]}
    message = _refusal(source | {"num_workers": num_workers}, "cannot decode the image")
    assert message.startswith(str(tmp_path / "train" / "dog" / "broken.png"))


def test_image_folder_layout_refusals(tmp_path: Path) -> None:
    source = {"source": "image_folder", "root": str(tmp_path), "size": [4, 4], "num_workers": 0}
    _refusal(source, "no train folder")
    _images(tmp_path, per_class=3, splits=("train", "test"))
    (tmp_path / "test" / "emu").mkdir()
    _refusal(source, r"classes \['emu'\] are not in")
    (tmp_path / "test" / "emu").rmdir()
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "notes.txt").write_text("no images here")
    _refusal(source, "class 'emu' has no images")


# --------------------------------------------------------------------------- module


DATA_MODULE = """
import torch
from torch.utils.data import TensorDataset
from training.sources import CustomData

def load(n=60, nan_at=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 5, generator=g)
    if nan_at is not None:
        x[nan_at, 0, 0] = float("nan")
    y = torch.arange(n) % 3
    return CustomData(train=TensorDataset(x, y), class_names=("a", "b", "c"))

def regression():
    x = torch.linspace(0, 1, 40)[:, None]
    test = TensorDataset(x[:5], 3 * x[:5, 0])
    return CustomData(TensorDataset(x, 3 * x[:, 0]), test, task="regression")

def nothing():
    return [1, 2, 3]

def ragged():
    items = [(torch.zeros(3 if i == 5 else 2), i % 2) for i in range(20)]
    return CustomData(train=items)
"""


@pytest.fixture
def data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "my_data.py").write_text(textwrap.dedent(DATA_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_data"
    sys.modules.pop("my_data", None)


def test_a_module_returns_data_sets_that_are_streamed(data_module: str) -> None:
    source = {"source": "module", "factory": f"{data_module}:load", "allow_custom": True}
    dataset = _load(**source)
    assert dataset.class_names == ("a", "b", "c") and dataset.input_shape == (2, 5)
    assert isinstance(dataset.train, StreamedSplit) and len(dataset.test) == 12
    regression = _load(**source | {"factory": f"{data_module}:regression", "in_memory": True})
    assert regression.task is Task.REGRESSION and len(regression.test) == 5
    torch.testing.assert_close(regression.test.y, 3 * regression.test.x[:, 0])


def test_module_refusals(data_module: str) -> None:
    source = {"source": "module", "factory": f"{data_module}:load", "allow_custom": True}
    _refusal(source | {"options": {"nan_at": 4}}, r"my_data:load train set item 4: input holds NaN")
    _refusal(source | {"factory": f"{data_module}:nothing"}, "returned list; expected a training")
    _refusal(source | {"factory": f"{data_module}:missing"}, "cannot load it")
    _refusal(
        source | {"factory": f"{data_module}:ragged"},
        r"ragged train set item 5: input has shape \[3\], the first item \[2\]",
    )


# --------------------------------------------------------------------------- augmentation


def test_augmentation_crops_padded_windows_and_flips() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) + 1
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = AugmentConfig(crop_padding=2, flip=True).apply(x, g)
        assert out.shape == x.shape
        for image, source in zip(out, padded, strict=True):
            windows = [
                source[:, r : r + 4, c : c + 5].flip(-1) if f else source[:, r : r + 4, c : c + 5]
                for r in range(5)
                for c in range(5)
                for f in (False, True)
            ]
            assert any(torch.equal(image, w) for w in windows)
    assert torch.equal(AugmentConfig().apply(x, g), x)


def test_only_sgd_batches_are_augmented_and_batchnorm_reads_plain_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = torch.rand(24, 2, 4, 4), torch.arange(24) % 2
    spec = InputSpec(shape=(2, 4, 4), mean=(0.5, 0.4), std=(0.2, 0.3))
    data = TrainingData(
        TensorSplit(x, y), spec, torch.device("cpu"), AugmentConfig(crop_padding=1, flip=True)
    )
    plain = spec.normalise(x)
    assert torch.equal(torch.cat(list(data.in_order(5))), plain)
    shuffled = torch.cat([xb for xb, _ in data.batches(5, torch.Generator().manual_seed(0))])
    assert not all(any(torch.equal(image, row) for row in plain) for image in shuffled)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    simplex = TrainedSimplex([dict(model.named_parameters())], dict(model.named_buffers()), [])
    config = parse_config({"modes": {"batch_size": 5}, "draws": {"batchnorm_batches": 3}})

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("BatchNorm statistics must not read augmented batches")

    monkeypatch.setattr(TrainingData, "batches", refuse)
    [[drawn]] = draw_members(config, model, [simplex], data)
    expected = recompute_batchnorm(
        model, simplex.vertices[0], simplex.buffers, spec.normalise(x).split(5)[:3]
    )
    for name, value in drawn.batchnorm.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_augmentation_needs_images(tmp_path: Path) -> None:
    source = _npz(tmp_path, x_train=_arrays()[0])
    _refusal(source | {"augment": {"flip": True}}, "data.augment needs images")


# --------------------------------------------------------------------------- training


def _image_config(root: Path, **data: Any) -> dict[str, Any]:
    section = {"source": "image_folder", "root": str(root), "size": [6, 6], "num_workers": 0}
    return IMAGE_TRAINING | {"data": section | data}


def test_streamed_images_train_the_weights_the_same_images_in_memory_do(tmp_path: Path) -> None:
    """The same rows in the same batches: equal weights, to the rounding of the normalisation
    statistics (float32 reductions in memory, float64 moments streamed; 1e-6 here)."""
    _images(tmp_path / "images", per_class=16)
    plain = {"crop_padding": 0, "flip": False}
    bundles = [
        load_bundle(
            train(
                parse_config(_image_config(tmp_path / "images", in_memory=memory, augment=plain)),
                tmp_path / f"bundle-{memory}",
            )[0]
        )
        for memory in (False, True)
    ]
    streamed, in_memory = bundles
    assert streamed.tensors.keys() == in_memory.tensors.keys()
    for name, tensor in streamed.tensors.items():
        torch.testing.assert_close(in_memory.tensors[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_espro_train_on_an_image_folder_writes_a_bundle_that_predict_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.cli import main

    _images(tmp_path / "images", per_class=12, splits=("train", "test"))
    config = tmp_path / "pets.yaml"
    data = {"num_workers": 2, "in_memory": False}
    config.write_text(
        yaml.safe_dump(_image_config(tmp_path / "images", **data) | {"precision": "bf16"})
    )
    assert main(["train", str(config), "-o", str(tmp_path / "bundle")]) == 0
    manifest = load_bundle(tmp_path / "bundle").manifest
    assert manifest.input.shape == (3, 6, 6) and manifest.class_names == CLASSES
    assert manifest.input.image == ImageSpec(size=(6, 6), color="rgb")
    recorded = manifest.training["config"]
    assert recorded["data"]["augment"] == {"crop_padding": 4, "flip": True}
    assert recorded["precision"] == "bf16"
    np.save(tmp_path / "inputs.npy", np.random.default_rng(0).random((2, 3, 6, 6), np.float32))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "bundle"), str(tmp_path / "inputs.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["class_name"] in CLASSES


def test_refused_data_claim_no_work_directory(tmp_path: Path) -> None:
    """A config corrected after its data were refused must not meet a work directory that
    belongs to the refused one."""
    config = parse_config(_image_config(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no train folder"):
        train(config, tmp_path / "bundle", workdir=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_bf16_forward_passes_change_the_weights_and_keep_them_float32() -> None:
    def fit(autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        trainer = SimplexTrainer(model, Task.CLASSIFICATION, autocast=autocast)
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
        data = TensorSplit(x, (x[:, 0] > 0).long())
        trainer.fit_mode(data, OptimSettings(epochs=2, lr=0.1), torch.Generator().manual_seed(2))
        return trainer.vertices[0]

    fp32, bf16 = fit(None), fit(torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert not torch.equal(fp32["0.weight"], bf16["0.weight"])
    torch.testing.assert_close(fp32["0.weight"], bf16["0.weight"], atol=0.05, rtol=0)


def test_progress_is_quiet_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trainer = SimplexTrainer(nn.Linear(2, 2), Task.CLASSIFICATION)
    data = TensorSplit(torch.randn(16, 2), torch.arange(16) % 2)
    trainer.fit_mode(data, OptimSettings(epochs=2, lr=0.1), torch.Generator())
    assert capsys.readouterr().err == ""


def test_the_processes_that_read_the_data_do_not_change_the_checkpoints_digest() -> None:
    def digest(**data: Any) -> str:
        section = {"source": "image_folder", "root": "r", "size": [4, 4]} | data
        return mode_digest(parse_config({"data": section}))

    assert digest(num_workers=0) == digest(num_workers=8) != digest(size=[4, 5])


def test_streamed_splits_pin_memory_for_cuda_only(tmp_path: Path) -> None:
    _images(tmp_path, per_class=20)
    train = _load(source="image_folder", root=str(tmp_path), size=[4, 4], num_workers=0).train
    assert isinstance(train, StreamedSplit) and not train.pin_memory
    assert train.for_device(torch.device("cuda")).pin_memory
    assert not train.for_device(torch.device("cpu")).pin_memory


def test_the_templates_read_data_laid_out_as_their_comments_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the templates' paths are relative to the working directory
    x, y = _arrays()
    np.savez("data.npz", x_train=x, y_train=y)
    _csv(tmp_path / "train.csv", "a,b,label", *[f"{i},{-i},{CLASSES[i % 3]}" for i in range(60)])
    _images(tmp_path / "images", per_class=20)
    for name, shape in {"arrays": (3,), "table": (2,), "image-folder": (3, 32, 32)}.items():
        config = load_config(name)
        data = config.data.model_copy(update={"num_workers": 0} if name == "image-folder" else {})
        assert load_dataset(data).input_shape == shape, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_augmented_bf16_training_on_cuda(tmp_path: Path) -> None:
    """Pinned batches from worker processes, augmentation and autocast on the GPU."""
    _images(tmp_path / "images", per_class=16)
    config = _image_config(tmp_path / "images", num_workers=2) | {
        "device": "cuda",
        "precision": "bf16",
    }
    path, results = train(parse_config(config), tmp_path / "bundle")
    assert results["test"]["espro"]["raw"]["accuracy"] >= 0.0
    assert all(
        t.device.type == "cpu" and t.dtype == torch.float32
        for t in load_bundle(path).tensors.values()
    )
