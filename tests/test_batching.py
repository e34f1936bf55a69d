"""The batcher that feeds the server's engine: batches grow with the load, and no caller is lost.

Every test runs on an event loop with a virtual clock: when nothing is ready to run, the clock
jumps to the next timer instead of sleeping, so waits are exact and take no real time.
"""

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from serving.batching import Batcher


@dataclass
class VirtualClock:
    now: float = 0.0


class JumpingSelector(selectors.DefaultSelector):
    """A selector that never blocks: with nothing ready, it moves ``clock`` on by the time
    the loop would have waited (until its next timer)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and timeout:
            self.clock.now += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is a :class:`VirtualClock`."""

    def __init__(self) -> None:
        self.clock = VirtualClock()
        super().__init__(JumpingSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


class Worker:
    """A batch function that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(items)
        self.started.set()
        await self.release.wait()
        return [item * 10 if isinstance(item, int) else item for item in items]


def run(test: Callable[[], Awaitable[None]]) -> None:
    """Run ``test`` on a :class:`VirtualTimeLoop`; it fails if it waits 60 virtual seconds."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(asyncio.wait_for(test(), timeout=60))


async def occupy(batcher: Batcher, worker: Worker) -> asyncio.Task:
    """Submit item 0 and return (its task) once the worker runs it, held until released."""
    worker.release.clear()
    first = asyncio.create_task(batcher.submit(0))
    await worker.started.wait()
    return first


def test_requests_that_arrive_while_a_batch_runs_form_one_batch_when_it_ends():
    # Ray Serve's @serve.batch made 10 batches of one here: it forms a batch before the
    # worker is free.
    async def test():
        worker = Worker()
        batcher = Batcher(worker, max_batch_size=32, batch_wait_timeout_s=0.0)
        first = await occupy(batcher, worker)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0)  # each task queues its item in its first step
        worker.release.set()
        assert await asyncio.gather(first, *rest) == [i * 10 for i in range(11)]
        assert worker.batches == [[0], list(range(1, 11))]

    run(test)


def test_batches_are_bounded_and_keep_the_order_of_arrival():
    async def test():
        worker = Worker()
        batcher = Batcher(worker, max_batch_size=4)
        first = await occupy(batcher, worker)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 10)]
        await asyncio.sleep(0)
        worker.release.set()
        await asyncio.gather(first, *rest)
        assert worker.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]

    run(test)


def test_a_lone_request_waits_for_company_only_up_to_the_timeout():
    async def test():
        worker = Worker()
        batcher = Batcher(worker, max_batch_size=8, batch_wait_timeout_s=0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(2))
        assert await asyncio.gather(first, second) == [10, 20]
        assert worker.batches == [[1, 2]]
        assert loop.time() - start == pytest.approx(0.2)  # it waited out the window, then ran

        start = loop.time()
        third = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0.3)  # past the window: the third runs alone
        assert third.done() and await third == 30
        assert await batcher.submit(4) == 40
        assert worker.batches[1:] == [[3], [4]]

        batcher.configure(max_batch_size=8, batch_wait_timeout_s=0.0)
        start = loop.time()
        assert await batcher.submit(5) == 50
        assert loop.time() == start  # no window: it ran at once

    run(test)


def test_a_full_batch_does_not_wait_out_the_window():
    async def test():
        worker = Worker()
        batcher = Batcher(worker, max_batch_size=3, batch_wait_timeout_s=5.0)
        start = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        assert results == [0, 10, 20] and worker.batches == [[0, 1, 2]]
        assert asyncio.get_running_loop().time() == start

    run(test)


def test_errors_reach_their_callers_and_the_batcher_goes_on():
    async def test():
        calls = []

        async def flaky(items: list[int]) -> list[Any]:
            calls.append(items)
            if len(calls) == 1:
                raise RuntimeError("engine down")
            return [ValueError(f"bad {i}") if i < 0 else i for i in items]

        batcher = Batcher(flaky, max_batch_size=8)
        with pytest.raises(RuntimeError, match="engine down"):
            await batcher.submit(1)
        results = await asyncio.gather(
            batcher.submit(2), batcher.submit(-3), return_exceptions=True
        )
        assert results[0] == 2
        assert isinstance(results[1], ValueError) and str(results[1]) == "bad -3"

    run(test)


def test_a_batch_function_with_the_wrong_number_of_results_fails_its_callers():
    async def test():
        async def short(items: list[int]) -> list[int]:
            return items[:-1]

        batcher = Batcher(short, max_batch_size=8)
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)

    run(test)


def test_a_caller_cancelled_while_queued_is_left_out():
    async def test():
        worker = Worker()
        batcher = Batcher(worker, max_batch_size=8)
        first = await occupy(batcher, worker)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        worker.release.set()
        assert await first == 0 and await kept == 20
        assert worker.batches == [[0], [2]]

    run(test)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_batch_size": 0, "batch_wait_timeout_s": 0.0}, "max_batch_size"),
        ({"max_batch_size": 1, "batch_wait_timeout_s": -1.0}, "batch_wait_timeout_s"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Batcher(Worker(), **settings)
