"""Grow the simplexes of a complex as Ray tasks, on a local Ray or on a cluster.

The modes and their simplexes are independent, so :class:`RayRunner` runs each as a task (with
one GPU when training on CUDA). The trainer, with its training data, goes to the object store
once. Tasks write their checkpoints where they run: on a cluster, give ``espro train`` a
``--workdir`` on storage every node shares to keep runs resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import ray

T = TypeVar("T")
R = TypeVar("R")


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


class RayRunner:
    """Runs each call as a Ray task with ``num_cpus`` CPUs and ``num_gpus`` GPUs."""

    def __init__(self, *, num_cpus: float = 1, num_gpus: float = 0) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayRunner needs Ray: call serving.cluster.connect() first")
        self.task = ray.remote(_call).options(num_cpus=num_cpus, num_gpus=num_gpus)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        shared = ray.put(fn)  # a bound method: its trainer and data are stored once
        return ray.get([self.task.remote(shared, item) for item in items])
