"""Data sets and how every source of data is split: train, validation, calibration, test.

A source's :meth:`~DataSource.read` returns its raw train and test splits; :func:`load_dataset`
carves the validation split (for temperature scaling) and the calibration split (for conformal
prediction sets) out of train, stratified by class, and computes the input normalisation on what
is left. The built-in data sets need no network: generated, shipped inside an installed package,
or on disk (CIFAR)::

    data = load_dataset(BuiltinData(name="digits", seed=1))
    data.train.x.shape  # [N, 1, 8, 8], float32, not normalised; see data.mean and data.std

The user's own data (arrays, tables, image folders, code) are the sources of
:mod:`training.sources`. ``seed`` seeds the carving and the draws of the generated data sets
(two_spirals, regression1d); the test splits of digits, mnist1d and CIFAR are fixed so that
results compare.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from serving.manifest import ImageSpec, Task
from training.augment import AugmentConfig
from training.errors import DataError
from training.splits import Split, TensorSplit

# scikit-learn, like torchvision, takes seconds to import: only the functions that use it do,
# so that `espro serve`, which reads this module's config types, starts without it.
if TYPE_CHECKING:  # torchvision takes seconds to import: only the CIFAR builders do
    from torchvision.datasets import CIFAR10

__all__ = [
    "DATASETS",
    "BuiltinData",
    "DataSource",
    "Dataset",
    "DatasetBuilder",
    "RawDataset",
    "hold_out_test",
    "load_dataset",
    "register_dataset",
]

TEST_FRACTION = 0.2
"""Share of the samples kept for testing where a data set has no test split of its own."""
_MIN_STD = 1e-6
TARGET_DTYPE = {Task.CLASSIFICATION: torch.int64, Task.REGRESSION: torch.float32}
_REGRESSION_CLUSTERS = ((-7.2, -4.8), (-1.2, 1.2), (4.8, 7.2))


@dataclass(frozen=True, eq=False)
class RawDataset:
    """What a data set's builder returns: its task, class names and raw train/test splits."""

    task: Task
    class_names: tuple[str, ...]
    train: Split
    test: Split


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set split four ways, with the normalisation statistics of its train split."""

    name: str
    task: Task
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    """Empty for regression."""
    train: Split
    val: Split
    """Held out from train, for temperature scaling."""
    calibration: Split
    """Held out from train, for conformal prediction sets."""
    test: Split
    mean: tuple[float, ...]
    """Per feature for rank-1 inputs, per channel otherwise; ``len == input_shape[0]``."""
    std: tuple[float, ...]
    """As ``mean``, floored at 1e-6."""


DatasetBuilder = Callable[..., RawDataset]
"""``builder(config, **config.options)``; the options are keyword-only with defaults."""

DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(fn: DatasetBuilder) -> DatasetBuilder:
    """Register ``fn`` as a data set under its function name (a decorator)."""
    if fn.__name__ in DATASETS:
        raise ValueError(f"data set {fn.__name__!r} is already registered")
    DATASETS[fn.__name__] = fn
    return fn


class DataSource(BaseModel):
    """Where the data come from (a subclass per ``source``) and how train is split up."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = Field(0, ge=0, lt=2**32)
    """The data seed, independent of the training seed."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of train held out for temperature scaling."""
    calibration_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of train held out for conformal prediction sets."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Random crops and flips of training images (:mod:`training.augment`); off by default."""

    @property
    def origin(self) -> str:
        """What errors and the data set's ``name`` call this source."""
        raise NotImplementedError

    def read(self) -> RawDataset:
        """The raw train and test splits; a file that cannot be read raises DataError."""
        raise NotImplementedError

    def image_spec(self) -> ImageSpec | None:
        """How a server turns encoded images into instances as this source did; ``None`` for a
        source of arrays."""
        return None


class BuiltinData(DataSource):
    """A registered data set (``DATASETS``): generated, shipped with a package, or CIFAR."""

    source: Literal["builtin"] = "builtin"
    name: str = "mnist1d"
    """A registered data set (see ``DATASETS``)."""
    root: Path | None = None
    """Folder of a torchvision data set (CIFAR)."""
    download: bool = False
    """Let torchvision download into ``root`` (needs a network)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of the data set's builder, e.g. ``n_samples`` or ``noise``."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
        return name

    @field_validator("options")
    @classmethod
    def _check_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        builder = DATASETS.get(info.data.get("name", ""))
        if builder is None:  # the name failed and is reported already
            return options
        accepted = [
            parameter.name
            for parameter in inspect.signature(builder).parameters.values()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for data set {info.data['name']!r}; "
                f"accepted: {accepted or 'none'}"
            )
        return options

    @property
    def origin(self) -> str:
        return self.name

    def read(self) -> RawDataset:
        return DATASETS[self.name](self, **self.options)


def load_dataset(config: DataSource) -> Dataset:
    """Read the data ``config`` names and split them into train/val/calibration/test."""
    raw = config.read()
    train, val, calibration = _carve(raw.train, raw.task, config)
    if config.augment.active and len(train.input_shape) != 3:
        raise DataError(
            f"{config.origin}: data.augment needs images [channels, height, width]; "
            f"the inputs are {list(train.input_shape)}"
        )
    mean, std = train.statistics()
    return Dataset(
        name=config.origin,
        task=raw.task,
        input_shape=train.input_shape,
        class_names=raw.class_names,
        train=train,
        val=val,
        calibration=calibration,
        test=raw.test,
        mean=tuple(mean.tolist()),
        std=tuple(max(value, _MIN_STD) for value in std.tolist()),
    )


def _stratified(
    split: Split, task: Task, test_size: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of ``split`` in two parts, the second ``test_size`` of it; stratified by
    class for classification."""
    from sklearn.model_selection import train_test_split  # seconds to import (see the top)

    labels = split.y.cpu().numpy() if task is Task.CLASSIFICATION else None
    try:
        return train_test_split(
            np.arange(len(split)), test_size=test_size, stratify=labels, random_state=seed
        )
    except ValueError as err:  # too few rows, or a class too small to stratify
        raise DataError(f"cannot hold out the {what}: {err}") from None


def _carve(split: Split, task: Task, config: DataSource) -> tuple[Split, Split, Split]:
    """Split ``split`` into train, val and calibration; stratified for classification."""
    held_out = config.val_fraction + config.calibration_fraction
    what = f"validation and calibration splits of {config.origin}"
    train_index, held_index = _stratified(split, task, held_out, config.seed, what)
    held = split.subset(held_index)
    val_index, calibration_index = _stratified(
        held, task, config.calibration_fraction / held_out, config.seed, what
    )
    return split.subset(train_index), held.subset(val_index), held.subset(calibration_index)


def hold_out_test(split: Split, task: Task, config: DataSource) -> tuple[Split, Split]:
    """Train and test splits of data that come without a test split: a seeded, stratified
    :data:`TEST_FRACTION` of the rows is held out for testing."""
    what = f"test split of {config.origin} (it has none of its own)"
    train_index, test_index = _stratified(split, task, TEST_FRACTION, config.seed, what)
    return split.subset(train_index), split.subset(test_index)


def _split(x: np.ndarray, y: np.ndarray, task: Task) -> TensorSplit:
    return TensorSplit(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=TARGET_DTYPE[task])
    )


def _generated(
    task: Task, class_names: tuple[str, ...], x: np.ndarray, y: np.ndarray
) -> RawDataset:
    """Split i.i.d. draws: the last ``TEST_FRACTION`` of them form the test split."""
    n_train = len(y) - round(len(y) * TEST_FRACTION)
    return RawDataset(
        task,
        class_names,
        train=_split(x[:n_train], y[:n_train], task),
        test=_split(x[n_train:], y[n_train:], task),
    )


@register_dataset
def digits(config: BuiltinData) -> RawDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); a fixed 20% test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images[:, None],
        bunch.target,
        test_size=TEST_FRACTION,
        stratify=bunch.target,
        random_state=0,
    )
    return RawDataset(
        Task.CLASSIFICATION,
        tuple(str(name) for name in bunch.target_names),
        train=_split(x_train, y_train, Task.CLASSIFICATION),
        test=_split(x_test, y_test, Task.CLASSIFICATION),
    )


@register_dataset
def mnist1d(config: BuiltinData, *, n_samples: int = 5000, train_split: float = 0.8) -> RawDataset:
    """MNIST-1D (Greydanus 2020), generated locally: 40-step signals, 10 classes.

    The defaults reproduce the published data set: 4,000 train and 1,000 test signals.
    """
    # Imported here: mnist1d imports matplotlib.pyplot and requests. make_dataset is pure
    # NumPy/SciPy (its get_dataset would download and write a pickle: never called).
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split = n_samples, train_split
    # make_dataset reseeds the global random and NumPy generators; restore them.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return RawDataset(
        Task.CLASSIFICATION,
        tuple(str(label) for label in data["templates"]["y"]),
        train=_split(data["x"][:, None], data["y"], Task.CLASSIFICATION),
        test=_split(data["x_test"][:, None], data["y_test"], Task.CLASSIFICATION),
    )


@register_dataset
def two_spirals(
    config: BuiltinData, *, n_samples: int = 1000, noise: float = 0.5, turns: float = 1.5
) -> RawDataset:
    """Two interleaved spiral arms in the plane, balanced; radius grows to ``2π·turns``."""
    rng = np.random.default_rng(config.seed)
    labels = np.arange(n_samples) % 2
    angle = np.sqrt(rng.uniform(size=n_samples)) * 2 * math.pi * turns
    arm = np.where(labels == 0, 1.0, -1.0)[:, None]  # arm 1 is arm 0 turned by π
    points = arm * angle[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    points += noise * rng.standard_normal(points.shape)
    return _generated(Task.CLASSIFICATION, ("arm 0", "arm 1"), points, labels)


@register_dataset
def regression1d(config: BuiltinData, *, n_samples: int = 1000, noise: float = 0.1) -> RawDataset:
    """y = sin(x) + x/10 + Gaussian noise, x uniform on three separated intervals."""
    rng = np.random.default_rng(config.seed)
    clusters = np.array(_REGRESSION_CLUSTERS)[
        rng.integers(len(_REGRESSION_CLUSTERS), size=n_samples)
    ]
    x = rng.uniform(clusters[:, 0], clusters[:, 1])
    y = np.sin(x) + 0.1 * x + noise * rng.standard_normal(n_samples)
    return _generated(Task.REGRESSION, (), x[:, None], y)


def _cifar(dataset_class: type[CIFAR10], config: BuiltinData) -> RawDataset:
    """Read CIFAR through torchvision; uint8 HWC images become float32 CHW in [0, 1]."""
    if config.root is None:
        raise DataError(
            f"data set {config.name!r} is read from disk: set data.root to the folder holding "
            f"{dataset_class.base_folder!r} (and data.download=true to fetch it there)"
        )
    try:
        train, test = (
            dataset_class(config.root, train=is_train, download=config.download)
            for is_train in (True, False)
        )
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"data set {config.name!r} not found in {Path(config.root, dataset_class.base_folder)}"
            "; put it there or set data.download=true (needs a network)"
        ) from err

    def split(images: CIFAR10) -> TensorSplit:
        x = images.data.transpose(0, 3, 1, 2).astype(np.float32, order="C")
        x /= 255.0
        return _split(x, np.asarray(images.targets), Task.CLASSIFICATION)

    return RawDataset(
        Task.CLASSIFICATION, tuple(train.classes), train=split(train), test=split(test)
    )


@register_dataset
def cifar10(config: BuiltinData) -> RawDataset:
    """CIFAR-10 from ``config.root`` via torchvision: 32x32 colour images, 10 classes."""
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, config)


@register_dataset
def cifar100(config: BuiltinData) -> RawDataset:
    """CIFAR-100 from ``config.root`` via torchvision: 32x32 colour images, 100 classes."""
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, config)
