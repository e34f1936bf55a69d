"""A split of a data set as the trainer reads it: held in memory or streamed from disk.

:class:`TensorSplit` holds its inputs as one tensor; :class:`StreamedSplit` reads them through
a ``torch.utils.data.DataLoader`` each time they are needed, so a data set larger than memory
trains. Both answer :class:`Split`: SGD asks for batches shuffled by a seeded generator,
BatchNorm recomputation for batches in order, evaluation for the inputs in chunks. For the same
rows both kinds give the same batches, so they train to the same weights (up to the rounding of
their normalisation statistics, which each computes its own way). Targets are in memory either
way: they are small, and stratified carving and the metrics need all of them.
:class:`TrainingData` is the training split as the trainers read it: normalised, on the training
device, augmented for SGD only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from serving.manifest import InputSpec
from training.augment import AugmentConfig
from training.errors import DataError

CHUNK = 512
"""Inputs a streamed split reads at a time for evaluation and for its scan."""


class Split(Protocol):
    """Inputs and targets of one split, read batch by batch."""

    @property
    def y(self) -> torch.Tensor:
        """int64 labels ``[N]`` (classification) or float32 targets ``[N]`` (regression)."""
        ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Raw float32 inputs and targets, in order, or shuffled by ``generator``."""
        ...

    def chunks(self) -> Iterator[torch.Tensor]:
        """Raw inputs in order, in chunks that bound the memory evaluation needs."""
        ...

    def subset(self, index: Any) -> Split:
        """The rows at ``index``, in that order."""
        ...

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 mean and standard deviation of the inputs, per feature for rank-1 inputs,
        per channel (dimension 0 of an input) otherwise."""
        ...

    def for_device(self, device: torch.device) -> Split:
        """This split, ready to feed ``device``."""
        ...


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled minibatches of in-memory tensors (the last one may be smaller)."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """A split held in memory."""

    x: torch.Tensor
    """Raw float32 inputs, ``[N, *input_shape]``."""
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"expected inputs [N, ...] and targets [N], got {list(self.x.shape)} "
                f"and {list(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if generator is not None:
            yield from minibatches(self.x, self.y, batch_size, generator)
            return
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def chunks(self) -> Iterator[torch.Tensor]:
        yield self.x

    def subset(self, index: Any) -> TensorSplit:
        return TensorSplit(self.x[index], self.y[index])

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        dims = (0,) if self.x.ndim == 2 else (0, *range(2, self.x.ndim))
        std, mean = torch.std_mean(self.x, dim=dims, correction=0)
        return mean, std

    def for_device(self, device: torch.device) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device))


@dataclass(frozen=True, eq=False)
class RowMoments:
    """Per row and channel, the float64 mean and sum of squared deviations of a streamed
    split's inputs over ``count`` values: the normalisation statistics of any subset of rows
    combine from them, without reading the inputs again."""

    mean: torch.Tensor
    """``[N, C]``."""
    m2: torch.Tensor
    """``[N, C]``."""
    count: int

    def subset(self, index: Any) -> RowMoments:
        return RowMoments(self.mean[index], self.m2[index], self.count)

    def combine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 mean and standard deviation per channel over every row."""
        mean = self.mean.mean(0)
        m2 = self.m2.sum(0) + self.count * (self.mean - mean).pow(2).sum(0)
        return mean.float(), (m2 / (self.count * len(self.mean))).sqrt().float()


def _stack_inputs(items: list[tuple[Any, Any]]) -> torch.Tensor:
    """A DataLoader's ``collate_fn``: the items' inputs as one float32 batch."""
    return torch.stack([torch.as_tensor(x).to(torch.float32) for x, _ in items])


@dataclass(frozen=True, eq=False)
class StreamedSplit:
    """A split whose inputs stay on disk: rows of a map-style dataset, read as they are used."""

    dataset: TorchDataset
    """Item ``i`` is ``(input, target)``; only the input is read (the targets are in ``y``)."""
    index: torch.Tensor
    """int64 rows of ``dataset`` in this split."""
    y: torch.Tensor
    moments: RowMoments
    input_shape: tuple[int, ...]
    num_workers: int = 0
    pin_memory: bool = False

    @classmethod
    def from_scan(
        cls, dataset: TorchDataset, found: Scan, y: torch.Tensor, num_workers: int
    ) -> StreamedSplit:
        """Every row of a dataset that :func:`scan` has read, with its checked targets."""
        index = torch.arange(len(y))
        return cls(dataset, index, y, found.moments, found.input_shape, num_workers)

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The same permutation as TensorSplit's: the same rows in the same batches.
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.index[order].tolist(),
            collate_fn=_stack_inputs,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for start, x in zip(range(0, n, batch_size), loader, strict=True):
            yield x, self.y[order[start : start + batch_size]]

    def chunks(self) -> Iterator[torch.Tensor]:
        return (x for x, _ in self.batches(CHUNK))

    def subset(self, index: Any) -> StreamedSplit:
        index = torch.as_tensor(index, dtype=torch.int64)
        return replace(
            self, index=self.index[index], y=self.y[index], moments=self.moments.subset(index)
        )

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moments.combine()

    def for_device(self, device: torch.device) -> StreamedSplit:
        return replace(self, pin_memory=device.type == "cuda")

    def to_memory(self) -> TensorSplit:
        """Every input read, in order, into one tensor."""
        return TensorSplit(torch.cat(list(self.chunks())), self.y)


@dataclass(frozen=True)
class Scan:
    """What one pass over a dataset found: every target, the inputs' shape and moments."""

    targets: list[int | float]
    input_shape: tuple[int, ...]
    moments: RowMoments


class _Checked(TorchDataset):
    """The items of a dataset reduced to what a scan keeps, a failure to its message: an
    exception raised in a DataLoader worker reaches the caller as a traceback, not one line."""

    def __init__(self, dataset: TorchDataset, name: str) -> None:
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[str | None, Any, Any, Any, Any]:
        try:
            x, target = self.dataset[i]
            x = torch.as_tensor(x)
            if x.is_complex():
                raise DataError(
                    f"{self.name} item {i}: input has dtype {x.dtype}; expected numbers"
                )
            if x.ndim == 0:
                raise DataError(f"{self.name} item {i}: input is a scalar; expected [features]")
            x = x.to(torch.float64)
            if not torch.isfinite(x).all():
                raise DataError(f"{self.name} item {i}: input holds NaN or infinite values")
            target = torch.as_tensor(target)
            if target.numel() != 1:
                raise DataError(f"{self.name} item {i}: target has shape {list(target.shape)}")
        except DataError as err:
            return str(err), None, None, None, None
        except Exception as err:  # the dataset is the user's code: its failure is one line
            return f"{self.name} item {i}: {type(err).__name__}: {err}", None, None, None, None
        rows = x.reshape(len(x), -1) if x.ndim > 1 else x[:, None]
        mean = rows.mean(1)
        m2 = (rows - mean[:, None]).pow(2).sum(1)
        return None, tuple(x.shape), target.item(), mean, m2


@dataclass(frozen=True)
class _Chunk:
    """Consecutive items of a scan, collated where they were read: a few tensors cross to
    the main process rather than a few per item."""

    error: str | None
    shapes: list[tuple[int, ...]]
    targets: list[int | float]
    mean: torch.Tensor | None
    """``[B, C]``, where every shape is alike."""
    m2: torch.Tensor | None


def _collate_scan(items: list[tuple[str | None, Any, Any, Any, Any]]) -> _Chunk:
    error = next((item[0] for item in items if item[0] is not None), None)
    if error is not None:
        return _Chunk(error, [], [], None, None)
    _, shapes, targets, means, m2s = zip(*items, strict=True)
    if len(set(shapes)) > 1:
        return _Chunk(None, list(shapes), list(targets), None, None)
    return _Chunk(None, list(shapes), list(targets), torch.stack(means), torch.stack(m2s))


def scan(dataset: TorchDataset, name: str, num_workers: int) -> Scan:
    """Read every item of ``dataset`` once: check its input (numeric, finite, of one shape) and
    keep its target and moments. A bad item raises a one-line :class:`DataError`."""
    checked = _Checked(dataset, name)
    loader = DataLoader(
        checked, batch_size=CHUNK, collate_fn=_collate_scan, num_workers=num_workers
    )
    targets: list[int | float] = []
    means, m2s = [], []
    shape: tuple[int, ...] | None = None
    progress = tqdm(
        total=len(checked), desc=f"reading {name}", unit="ex", leave=False, disable=None
    )
    with progress:
        for chunk in loader:
            if chunk.error is not None:
                raise DataError(chunk.error)
            shape = shape or chunk.shapes[0]
            for offset, row_shape in enumerate(chunk.shapes):
                if row_shape != shape:
                    raise DataError(
                        f"{name} item {len(targets) + offset}: input has shape "
                        f"{list(row_shape)}, the first item {list(shape)}"
                    )
            targets += chunk.targets
            means.append(chunk.mean)
            m2s.append(chunk.m2)
            progress.update(len(chunk.targets))
    if shape is None:
        raise DataError(f"{name} is empty")
    count = 1 if len(shape) == 1 else int(torch.Size(shape[1:]).numel())
    return Scan(targets, shape, RowMoments(torch.cat(means), torch.cat(m2s), count))


def split_outputs(outputs: Callable[[torch.Tensor], torch.Tensor], split: Split) -> torch.Tensor:
    """``outputs`` (member outputs ``[S, B, ·]`` of raw inputs) of a whole split, chunk by chunk."""
    return torch.cat([outputs(x) for x in split.chunks()], dim=1)


@dataclass(frozen=True, eq=False)
class TrainingData:
    """The training split as the trainers read it: normalised batches on ``device``."""

    split: Split
    input_spec: InputSpec
    device: torch.device
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __len__(self) -> int:
        return len(self.split)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """SGD's batches: shuffled by ``generator``, augmented as configured."""
        for x, y in self.split.batches(batch_size, generator):
            x = self._inputs(x)
            if self.augment.active:
                x = self.augment.apply(x, generator)
            yield self.input_spec.normalise(x), y.to(self.device, non_blocking=True)

    def labelled(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Inputs and targets in order, never augmented: how a held-out split is scored."""
        for x, y in self.split.batches(batch_size):
            yield self.input_spec.normalise(self._inputs(x)), y.to(self.device, non_blocking=True)

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Inputs in order and never augmented: what BatchNorm statistics are estimated on."""
        for x, _ in self.split.batches(batch_size):
            yield self.input_spec.normalise(self._inputs(x))
