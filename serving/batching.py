"""Coalescing concurrent requests into batches for one worker.

Ray Serve's ``@serve.batch`` (Ray 2.60) forms each batch as soon as its wait ends and only then
queues it for the worker. Under steady load the worker is busy when requests arrive, so most
requests become batches of one that wait their turn (docs/performance.md). :class:`Batcher`
forms a batch when the worker is free to run it, from everything queued by then, so the batch
grows with the load while a lone request still waits at most ``batch_wait_timeout_s``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

RunBatch = Callable[[list[T]], Awaitable[Sequence[R | Exception]]]


class Batcher(Generic[T, R]):
    """Runs ``run`` on batches of submitted items, one batch at a time.

    ``run`` takes a list of items and returns one result per item, in order; a result that is
    an exception is raised to that item's caller. If ``run`` itself raises, every caller of the
    batch gets the exception and the batcher goes on with the next batch. A caller cancelled
    while queued is left out of its batch. The batcher belongs to the event loop of its first
    :meth:`submit`.
    """

    def __init__(
        self, run: RunBatch[T, R], *, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.0
    ) -> None:
        self._run = run
        self.configure(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    def configure(self, *, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Change the batch size bound and the wait; the next batch formed uses them."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s

    async def submit(self, item: T) -> R:
        """Queue ``item`` and return its result once its batch has run."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(self._queue), name="espro-batcher")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _work(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> None:
        while True:
            batch = await self._next_batch(queue)
            if batch:
                await self._run_batch(batch)

    async def _next_batch(
        self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]
    ) -> list[tuple[T, asyncio.Future[R]]]:
        """Everything queued (up to the bound) once one item is; if that item came alone to
        an idle worker, what else arrives within the wait."""
        batch = [await queue.get()]
        if queue.empty() and self.batch_wait_timeout_s > 0:
            deadline = asyncio.get_running_loop().time() + self.batch_wait_timeout_s
            while len(batch) < self.max_batch_size:
                try:
                    async with asyncio.timeout_at(deadline):
                        batch.append(await queue.get())
                except TimeoutError:
                    break
        while len(batch) < self.max_batch_size and not queue.empty():
            batch.append(queue.get_nowait())
        return [(item, future) for item, future in batch if not future.done()]

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
        except Exception as err:  # every caller of the batch gets it
            results = [err] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # cancelled while its batch ran
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
