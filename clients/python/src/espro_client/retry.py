"""Retries with exponential backoff and full jitter, for answers that may succeed later."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from espro_client.errors import EsproError, Timeout, Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """How often and how long to retry :class:`~espro_client.errors.Unavailable` answers
    (HTTP 429 and 503, gRPC ``UNAVAILABLE``, connection failures, a replica that died
    mid-request) and, unless ``timeouts`` is off, :class:`~espro_client.errors.Timeout` (no
    answer within the client's timeout, HTTP 408 and 504, gRPC ``DEADLINE_EXCEEDED``); nothing
    else is retried.
    Predictions change nothing on the server, so sending one again is always safe.

    Before retry ``n`` (from 0) the client sleeps a uniformly random time in
    ``[0, min(max_backoff, backoff * 2**n)]``, or the server's ``Retry-After`` if longer.
    """

    attempts: int = 4
    """Tries in all, the first included (1: never retry)."""
    backoff: float = 0.1
    """Seconds: the upper bound of the first sleep."""
    max_backoff: float = 10.0
    """Seconds: the most any one sleep's upper bound grows to."""
    timeouts: bool = True
    """Whether a request that timed out is sent again (each try waits up to the timeout)."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("attempts must be at least 1 and the backoffs non-negative")

    def delay(self, err: EsproError, retry: int) -> float | None:
        """Seconds to sleep before retry ``retry`` (from 0) after ``err``; ``None``: give up."""
        retried = isinstance(err, Unavailable) or (self.timeouts and isinstance(err, Timeout))
        if not retried or retry >= self.attempts - 1:
            return None
        jitter = random.uniform(0, min(self.max_backoff, self.backoff * 2**retry))
        return max(jitter, getattr(err, "retry_after", None) or 0.0)

    def call(self, send: Callable[[], T]) -> T:
        """``send()``, retried while it raises a retried error and attempts remain."""
        retry = 0
        while True:
            try:
                return send()
            except (Unavailable, Timeout) as err:
                delay = self.delay(err, retry)
                if delay is None:
                    raise
            time.sleep(delay)
            retry += 1

    async def acall(self, send: Callable[[], Awaitable[T]]) -> T:
        """:meth:`call` for a coroutine function."""
        retry = 0
        while True:
            try:
                return await send()
            except (Unavailable, Timeout) as err:
                delay = self.delay(err, retry)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            retry += 1
