"""Where ``espro train`` reads its data: the ``data`` section of a config, one model per source.

``source`` picks the model; a section without one names a built-in data set::

    data: {name: mnist1d}                                   # builtin
    data: {source: arrays, path: data.npz}                  # x_train, y_train[, x_test, y_test]
    data: {source: table, path: train.csv, label: species}  # numeric feature columns
    data: {source: image_folder, root: photos, size: [64, 64]}   # training.images
    data: {source: module, factory: "mypkg.data:load", allow_custom: true}

Arrays and tables are read into memory; image folders and ``module`` data sets are streamed
from disk as training runs. Every problem with a file is a one-line :class:`DataError` that
names the file (and the row and column, or the array) and what is wrong with it.
"""

from __future__ import annotations

import csv
import functools
import importlib
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Discriminator, Field, Tag, model_validator
from torch.utils.data import Dataset as TorchDataset

from serving.manifest import Task
from training.data import TARGET_DTYPE, BuiltinData, DataSource, RawDataset, hold_out_test
from training.errors import DataError
from training.images import ImageFolderData
from training.splits import Split, StreamedSplit, TensorSplit, scan

__all__ = [
    "SOURCES",
    "ArraysData",
    "CustomData",
    "DataConfig",
    "ModuleData",
    "TableData",
]

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test", "class_names")


# --------------------------------------------------------------------------- targets


class _Labels(NamedTuple):
    """One split's labels or targets, and how errors name them and their rows."""

    values: np.ndarray
    where: str
    lines: list[int] | None = None
    """The line of a file each row is on, where rows are lines (a table)."""

    def row(self, bad: np.ndarray) -> tuple[int, str]:
        """The first row where ``bad`` holds, and its name."""
        i = int(np.flatnonzero(bad)[0])
        return i, f"line {self.lines[i]}" if self.lines else f"row {i}"


def _regression_targets(labels: _Labels) -> torch.Tensor:
    if labels.values.dtype.kind not in "biuf":
        raise DataError(
            f"{labels.where}: targets have dtype {labels.values.dtype}; regression needs numbers"
        )
    values = labels.values.astype(np.float64)
    if not np.isfinite(values).all():
        i, row = labels.row(~np.isfinite(values))
        raise DataError(f"{labels.where}, {row}: target {values[i]} is not a finite number")
    return torch.as_tensor(values, dtype=TARGET_DTYPE[Task.REGRESSION])


def _label_order(labels: np.ndarray) -> list[str]:
    """Distinct string labels, in numeric order where every one is an integer."""
    distinct = sorted(set(labels.tolist()))
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return distinct


def _class_targets(
    splits: Sequence[_Labels], class_names: tuple[str, ...] | None
) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """Class indices of each split's labels (train first) and the class names.

    Labels are integers ``0..K-1`` (named by ``class_names`` where given, else by their
    number) or strings (``class_names``, else every training label, sorted). Every class needs
    a training example.
    """
    for labels in splits:
        if labels.values.dtype.kind not in "biuUS":
            raise DataError(
                f"{labels.where}: labels have dtype {labels.values.dtype}; classification "
                "needs integer or string labels (for numeric targets set data.task: regression)"
            )
    train = splits[0].values
    targets = []
    if train.dtype.kind in "US":
        names = class_names or tuple(_label_order(train.astype(str)))
        lookup = {name: i for i, name in enumerate(names)}
        for labels in splits:
            strings = labels.values.astype(str)
            unknown = ~np.isin(strings, names)
            if unknown.any():
                i, row = labels.row(unknown)
                raise DataError(
                    f"{labels.where}, {row}: label {str(strings[i])!r} is not a class of the "
                    f"training labels {list(names)[:10]}"
                )
            targets.append(np.array([lookup[s] for s in strings.tolist()], dtype=np.int64))
    else:
        count = len(class_names) if class_names else int(train.max(initial=-1)) + 1
        names = class_names or tuple(str(i) for i in range(count))
        for labels in splits:
            outside = (labels.values < 0) | (labels.values >= count)
            if outside.any():
                i, row = labels.row(outside)
                named = f" ({count} class_names)" if class_names else ""
                raise DataError(
                    f"{labels.where}, {row}: label {labels.values[i]} is not a class index "
                    f"0..{count - 1}{named}"
                )
            targets.append(labels.values.astype(np.int64))
    counts = np.bincount(targets[0], minlength=len(names))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{splits[0].where}: class(es) {empty[:10]} have no training examples")
    return [torch.as_tensor(t) for t in targets], tuple(names)


def _targets(
    task: Task, splits: Sequence[_Labels], class_names: tuple[str, ...] | None = None
) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """Targets of each split's labels for ``task``, and the class names (none for regression)."""
    if task is Task.REGRESSION:
        return [_regression_targets(labels) for labels in splits], ()
    return _class_targets(splits, class_names)


def _with_test(
    config: DataSource, task: Task, class_names: tuple[str, ...], train: Split, test: Split | None
) -> RawDataset:
    if test is None:
        train, test = hold_out_test(train, task, config)
    return RawDataset(task, class_names, train, test)


# --------------------------------------------------------------------------- arrays


def _guarded(where: str, read: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``read(*args, **kwargs)``, its failure a DataError naming ``where``."""
    try:
        return read(*args, **kwargs)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataError(
                f"{where}: holds Python objects (a ragged or pickled array); "
                "save numbers in a rectangular array"
            ) from None
        raise DataError(f"{where}: cannot read as a NumPy array: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{where}: cannot read as a NumPy array: {err}") from None


def _read_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays of a ``.npz`` file or of a folder of ``.npy`` files, and what errors call
    each one."""
    if path.is_dir():
        where = {key: str(path / f"{key}.npy") for key in ARRAY_KEYS}
        arrays = {
            key: _guarded(where[key], np.load, where[key], allow_pickle=False)
            for key in ARRAY_KEYS
            if Path(where[key]).is_file()
        }
        return arrays, where
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    where = {key: f"{path}[{key}]" for key in ARRAY_KEYS}
    npz = _guarded(str(path), np.load, path, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single array; expected a .npz of named arrays (x_train, ...)")
    with npz:
        unknown = sorted(set(npz.files) - set(ARRAY_KEYS))
        if unknown:
            raise DataError(f"{path}: unknown arrays {unknown}; expected {', '.join(ARRAY_KEYS)}")
        return {key: _guarded(where[key], npz.__getitem__, key) for key in npz.files}, where


def _inputs(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: inputs have dtype {x.dtype}; expected numbers")
    if x.ndim < 2:
        raise DataError(
            f"{where}: inputs have shape {list(x.shape)}; expected [N, features...] "
            "(one row per example; reshape to [N, 1] for one feature)"
        )
    if len(x) == 0:
        raise DataError(f"{where}: no rows")
    rows = x.reshape(len(x), -1)
    if x.dtype.kind == "f" and not np.isfinite(rows).all():
        row = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        raise DataError(f"{where}: row {row} holds NaN or infinite values")
    return torch.as_tensor(x.astype(np.float32))


class ArraysData(DataSource):
    """NumPy arrays: ``x_train`` ``[N, ...]``, ``y_train`` ``[N]``, optionally ``x_test``,
    ``y_test`` and ``class_names``; read without pickle."""

    source: Literal["arrays"]
    path: Path
    """A ``.npz`` file, or a folder of ``.npy`` files named after the arrays."""
    task: Task = Task.CLASSIFICATION
    """``classification`` (integer or string labels) or ``regression`` (numeric targets)."""

    @property
    def origin(self) -> str:
        return str(self.path)

    def read(self) -> RawDataset:
        arrays, where = _read_arrays(self.path)
        for key in ("x_train", "y_train"):
            if key not in arrays:
                raise DataError(f"{self.path}: no {key} array (it needs x_train and y_train)")
        if ("x_test" in arrays) != ("y_test" in arrays):
            raise DataError(f"{self.path}: x_test and y_test go together; it has only one")
        parts = ["train"] + (["test"] if "x_test" in arrays else [])
        x = {part: _inputs(arrays[f"x_{part}"], where[f"x_{part}"]) for part in parts}
        for part in parts:
            y, n = arrays[f"y_{part}"], len(x[part])
            if y.shape != (n,):
                raise DataError(
                    f"{where[f'y_{part}']}: shape {list(y.shape)}; expected [{n}], one target "
                    f"per row of x_{part}"
                )
        if "test" in x and x["test"].shape[1:] != x["train"].shape[1:]:
            raise DataError(
                f"{where['x_test']}: rows of shape {list(x['test'].shape[1:])}; x_train's are "
                f"{list(x['train'].shape[1:])}"
            )
        class_names = None
        if "class_names" in arrays:
            names = arrays["class_names"]
            if names.ndim != 1 or names.dtype.kind not in "US":
                raise DataError(f"{where['class_names']}: expected a 1-D array of strings")
            class_names = tuple(names.astype(str).tolist())
        y, names = _targets(
            self.task, [_Labels(arrays[f"y_{p}"], where[f"y_{p}"]) for p in parts], class_names
        )
        splits = [TensorSplit(x[p], t) for p, t in zip(parts, y, strict=True)]
        return _with_test(self, self.task, names, splits[0], splits[1] if len(splits) > 1 else None)


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class _Table:
    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    """The line of the file each row ends on."""

    def column(self, name: str) -> list[str]:
        if name not in self.header:
            raise DataError(f"{self.path}: no column {name!r}; columns: {', '.join(self.header)}")
        j = self.header.index(name)
        return [row[j] for row in self.rows]

    def strings(self, name: str) -> list[str]:
        """The values of a column, none of them empty."""
        values = self.column(name)
        for text, line in zip(values, self.lines, strict=True):
            if not text.strip():
                raise DataError(f"{self.path}, line {line}, column {name!r}: the value is missing")
        return values

    def numbers(self, name: str) -> np.ndarray:
        """The values of a column as finite numbers."""
        values = np.empty(len(self.rows), dtype=np.float64)
        for i, (text, line) in enumerate(zip(self.strings(name), self.lines, strict=True)):
            where = f"{self.path}, line {line}, column {name!r}"
            try:
                values[i] = float(text)
            except ValueError:
                raise DataError(f"{where}: {text!r} is not a number") from None
            if not math.isfinite(values[i]):
                raise DataError(f"{where}: {text!r} is not a finite number")
        return values


def _read_table(path: Path) -> _Table:
    if path.suffix.lower() == ".parquet":
        raise DataError(f"{path}: Parquet tables are not read; save the table as CSV")
    try:
        with path.open(newline="") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            rows, lines = [], []
            for row in reader:
                if row:  # a blank line
                    rows.append(row)
                    lines.append(reader.line_num)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as CSV text: {err}") from None
    if not header:
        raise DataError(f"{path}: empty; expected a header row of column names, then rows")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: columns {repeated} appear more than once in the header")
    for row, line in zip(rows, lines, strict=True):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields; the header has {len(header)}")
    if not rows:
        raise DataError(f"{path}: no rows under the header")
    return _Table(path, header, rows, lines)


class TableData(DataSource):
    """A CSV table with a header row: one label column and numeric feature columns."""

    source: Literal["table"]
    path: Path
    """The training table."""
    test_path: Path | None = None
    """A test table with the same columns; without it a seeded test split is held out."""
    label: str
    """The column of labels (classification) or targets (regression)."""
    features: list[str] | None = Field(default=None, min_length=1)
    """The feature columns, in order; every other column by default."""
    task: Task = Task.CLASSIFICATION
    """``classification`` (integer or string labels) or ``regression`` (numeric targets)."""

    @model_validator(mode="after")
    def _label_is_no_feature(self) -> TableData:
        if self.features and self.label in self.features:
            raise ValueError(f"the label column {self.label!r} cannot be a feature too")
        return self

    @property
    def origin(self) -> str:
        return str(self.path)

    def read(self) -> RawDataset:
        tables = [_read_table(self.path)]
        if self.test_path is not None:
            tables.append(_read_table(self.test_path))
        features = self.features or [c for c in tables[0].header if c != self.label]
        if not features:
            raise DataError(f"{self.path}: no feature columns besides {self.label!r}")
        labels = [
            _Labels(
                table.numbers(self.label)
                if self.task is Task.REGRESSION
                else np.array(table.strings(self.label), dtype=str),
                f"{table.path}, column {self.label!r}",
                table.lines,
            )
            for table in tables
        ]
        y, names = _targets(self.task, labels)
        splits = [
            TensorSplit(
                torch.as_tensor(
                    np.stack([t.numbers(c) for c in features], axis=1), dtype=torch.float32
                ),
                targets,
            )
            for t, targets in zip(tables, y, strict=True)
        ]
        return _with_test(self, self.task, names, splits[0], splits[1] if len(splits) > 1 else None)


# --------------------------------------------------------------------------- module


@dataclass(frozen=True)
class CustomData:
    """What the factory of a ``module`` source returns.

    The data sets are map-style (``len`` and ``[i]``); item ``i`` is ``(input, target)``, the
    input a tensor or array of one shape (raw: espro normalises it), the target a class index
    (classification) or a number (regression). They are streamed, batch by batch.
    """

    train: TorchDataset
    test: TorchDataset | None = None
    """Without it a seeded test split is held out of ``train``."""
    class_names: Sequence[str] = ()
    """Names of the classes ``0..K-1``; their numbers by default."""
    task: Task = Task.CLASSIFICATION


class ModuleData(DataSource):
    """Data sets built by code: ``package.module:callable(**options)`` returns a
    :class:`CustomData`. The code runs when the data are loaded, so it must be allowed."""

    source: Literal["module"]
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    allow_custom: bool = False
    """Allow the factory, which runs code named by the config."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the factory."""
    num_workers: int = Field(default=0, ge=0)
    """Processes that read items for each pass over the data (0: the training process)."""
    in_memory: bool = False
    """Read every item once and keep them all in memory: faster, for data that fit."""

    @model_validator(mode="after")
    def _allowed(self) -> ModuleData:
        if not self.allow_custom:
            raise ValueError(
                f"{self.factory!r} is custom code: set data.allow_custom: true to run it"
            )
        return self

    @property
    def origin(self) -> str:
        return self.factory

    def read(self) -> RawDataset:
        module_name, _, attribute = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
            factory = functools.reduce(getattr, attribute.split("."), module)
        except (ImportError, AttributeError) as err:
            raise DataError(f"data.factory {self.factory!r}: cannot load it: {err}") from None
        data = factory(**self.options)
        if not isinstance(data, CustomData):
            raise DataError(
                f"data.factory {self.factory!r} returned {type(data).__name__}; "
                "expected a training.sources.CustomData"
            )
        task = Task(data.task)
        parts = {"train": data.train} | ({"test": data.test} if data.test is not None else {})
        found = {
            part: scan(dataset, f"{self.factory} {part} set", self.num_workers)
            for part, dataset in parts.items()
        }
        if "test" in found and found["test"].input_shape != found["train"].input_shape:
            raise DataError(
                f"{self.factory} test set: inputs of shape {list(found['test'].input_shape)}; "
                f"the train set's are {list(found['train'].input_shape)}"
            )
        labels = [
            _Labels(np.asarray(f.targets), f"{self.factory} {p} set") for p, f in found.items()
        ]
        y, names = _targets(task, labels, tuple(data.class_names) or None)
        splits: list[Split] = []
        for (part, dataset), targets in zip(parts.items(), y, strict=True):
            split = StreamedSplit.from_scan(dataset, found[part], targets, self.num_workers)
            splits.append(split.to_memory() if self.in_memory else split)
        return _with_test(self, task, names, splits[0], splits[1] if len(splits) > 1 else None)


# --------------------------------------------------------------------------- the union


def source(section: Any) -> str:
    """The ``source`` of a data section; a section without one is a built-in data set."""
    return section.get("source", "builtin") if isinstance(section, dict) else section.source


DataConfig = Annotated[
    Annotated[BuiltinData, Tag("builtin")]
    | Annotated[ArraysData, Tag("arrays")]
    | Annotated[TableData, Tag("table")]
    | Annotated[ImageFolderData, Tag("image_folder")]
    | Annotated[ModuleData, Tag("module")],
    Discriminator(source),
]
"""The ``data`` section of a training config: one source's model, picked by ``source``."""

SOURCES = ("builtin", "arrays", "table", "image_folder", "module")
