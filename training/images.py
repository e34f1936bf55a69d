"""A folder of labelled images, torchvision style, read from disk as training runs::

    root/train/<class>/<image>.png    (or .jpg, .jpeg; class folders name the classes)
    root/test/<class>/<image>.png     (optional; without it a seeded test split is held out)

Every image is decoded with :func:`torchvision.io.decode_image`, converted to RGB or grayscale,
scaled to [0, 1] and resized to the configured size. Loading reads each image once, in parallel,
to refuse an unreadable one before training starts and to gather the normalisation statistics;
after that the images stay on disk and are read batch by batch (unless ``in_memory``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch.utils.data import Dataset as TorchDataset

from serving.images import decode_reason, to_instance
from serving.manifest import ImageSpec, Task
from training.augment import AugmentConfig
from training.data import DataSource, RawDataset, hold_out_test
from training.errors import DataError
from training.splits import Split, StreamedSplit, scan

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageFiles(TorchDataset):
    """Image files and their labels; item ``i`` is ``(float32 [C, H, W] in [0, 1], label)``."""

    def __init__(
        self, paths: list[Path], labels: list[int], size: tuple[int, int], color: str
    ) -> None:
        self.paths, self.labels, self.size, self.color = paths, labels, size, color

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import read_file  # seconds to import

        path = self.paths[i]
        try:
            x = to_instance(read_file(str(path)), self.size, self.color)
        except (RuntimeError, ValueError, OSError) as err:
            raise DataError(f"{path}: cannot decode the image: {decode_reason(err)}") from None
        return x, self.labels[i]


class ImageFolderData(DataSource):
    """Images in ``root/train/<class>/`` (and optionally ``root/test/<class>/``)."""

    source: Literal["image_folder"]
    root: Path
    size: tuple[PositiveInt, PositiveInt]
    """``[height, width]`` every image is resized to."""
    color: Literal["rgb", "grayscale"] = "rgb"
    num_workers: int = Field(default=2, ge=0)
    """Processes that decode images for each pass over the data (0: the training process)."""
    in_memory: bool = False
    """Decode every image once and keep them all in memory: faster, for folders that fit."""
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig(crop_padding=4, flip=True))
    """Random crops and flips of training images; the paper's CIFAR recipe by default."""

    @property
    def origin(self) -> str:
        return str(self.root)

    def image_spec(self) -> ImageSpec:
        return ImageSpec(size=self.size, color=self.color)

    def read(self) -> RawDataset:
        train_folder, test_folder = self.root / "train", self.root / "test"
        if not train_folder.is_dir():
            raise DataError(
                f"{self.root}: no train folder; expected {train_folder}/<class>/<image>.png"
            )
        class_names = tuple(sorted(d.name for d in train_folder.iterdir() if d.is_dir()))
        if not class_names:
            raise DataError(f"{train_folder}: no class folders; expected <class>/<image>.png")
        train = self._split(train_folder, class_names)
        if test_folder.is_dir():
            unknown = sorted(
                {d.name for d in test_folder.iterdir() if d.is_dir()} - set(class_names)
            )
            if unknown:
                raise DataError(f"{test_folder}: classes {unknown} are not in {train_folder}")
            return RawDataset(
                Task.CLASSIFICATION, class_names, train, self._split(test_folder, class_names)
            )
        train, test = hold_out_test(train, Task.CLASSIFICATION, self)
        return RawDataset(Task.CLASSIFICATION, class_names, train, test)

    def _split(self, folder: Path, class_names: tuple[str, ...]) -> Split:
        paths, labels = [], []
        for label, name in enumerate(class_names):
            files = sorted(
                p
                for p in (folder / name).rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not files and folder.name == "train":
                raise DataError(f"{folder / name}: class {name!r} has no images (.png, .jpg)")
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise DataError(f"{folder}: no images (.png, .jpg, .jpeg) in its class folders")
        images = ImageFiles(paths, labels, self.size, self.color)
        found = scan(images, str(folder), self.num_workers)
        y = torch.tensor(labels, dtype=torch.int64)
        split = StreamedSplit.from_scan(images, found, y, self.num_workers)
        return split.to_memory() if self.in_memory else split
