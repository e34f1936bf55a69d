"""Overload: past its capacity the server sheds load with 503s and keeps admitted requests fast.

The app is redeployed with a small bounded queue (Serve's ``max_ongoing_requests`` and
``max_queued_requests``) and no batching, so the ``slow`` model (one member, 50 ms a forward
pass) answers about one request per service time. The test measures that capacity with a
closed loop, then offers twice as much in an open loop (a fixed arrival rate, whatever the
answers do) and checks that every request is answered, 200 or 503 with ``Retry-After``, none
lost or timed out, and that admitted requests wait no longer than the bounded queue allows.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

ONGOING, QUEUED = 2, 4
"""The bounded queue under test: requests a replica holds, requests the proxy queues."""
PROBE_S, OVERLOAD_S, OVERLOAD = 2.0, 4.0, 2.0
"""Seconds of capacity measurement, seconds of overload, and the overload factor."""
BODY = {"inputs": [[0.5, -1.0, 0.25, 2.0]]}


def post(client: httpx.Client, url: str) -> tuple[int | str, float, str | None]:
    """Status (or the exception's name when there was no answer), latency, Retry-After."""
    start = time.perf_counter()
    try:
        response = client.post(url, json=BODY)
    except httpx.HTTPError as err:
        return type(err).__name__, time.perf_counter() - start, None
    return response.status_code, time.perf_counter() - start, response.headers.get("retry-after")


def capacity(client: httpx.Client, url: str) -> tuple[float, float]:
    """Requests per second answered by a closed loop of ``ONGOING`` clients, and the median
    latency of a request, over ``PROBE_S`` seconds."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + PROBE_S

    def loop() -> None:
        while time.perf_counter() < stop:
            status, latency, _ = post(client, url)
            assert status == 200, status
            with lock:
                latencies.append(latency)

    start = time.perf_counter()
    with ThreadPoolExecutor(ONGOING) as pool:
        for future in [pool.submit(loop) for _ in range(ONGOING)]:
            future.result()
    return len(latencies) / (time.perf_counter() - start), statistics.median(latencies)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def test_overload_is_shed_with_503_and_admitted_latency_stays_bounded(server):
    url = f"{server.http}/v1/models/slow/predict"
    server.redeploy(
        max_batch_size=1,
        batch_wait_timeout_s=0.0,
        max_ongoing_requests=ONGOING,
        max_queued_requests=QUEUED,
    )
    try:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        with httpx.Client(timeout=30, limits=limits) as client:
            post(client, url)  # warm up the route and the connection pool
            rate, service_time = capacity(client, url)
            interval = 1 / (OVERLOAD * rate)
            with ThreadPoolExecutor(128) as pool:
                futures = []
                start = time.perf_counter()
                while (now := time.perf_counter()) < start + OVERLOAD_S:
                    futures.append(pool.submit(post, client, url))
                    time.sleep(max(0.0, start + len(futures) * interval - now))
                answers = [future.result() for future in futures]
    finally:
        server.redeploy()

    statuses = [status for status, _, _ in answers]
    admitted = [latency for status, latency, _ in answers if status == 200]
    refused = [(latency, retry) for status, latency, retry in answers if status == 503]
    summary = (
        f"capacity {rate:.1f} req/s (median {service_time * 1e3:.0f} ms), offered "
        f"{len(answers) / OVERLOAD_S:.1f} req/s for {OVERLOAD_S:.0f} s: {len(admitted)} x 200, "
        f"{len(refused)} x 503, admitted p50 {statistics.median(admitted) * 1e3:.0f} ms "
        f"p99 {p99(admitted) * 1e3:.0f} ms, 503 p99 {p99([r[0] for r in refused]) * 1e3:.0f} ms"
    )
    print(summary)
    assert set(statuses) <= {200, 503}, f"unanswered or unexpected: {set(statuses)}; {summary}"
    assert admitted and refused, summary
    assert all(retry == "1" for _, retry in refused), "a 503 without Retry-After"
    # An admitted request has at most ONGOING + QUEUED requests ahead of it, each taking about
    # 1 / rate: that wait, doubled for noise on shared cores, plus half a second. Without the
    # bound, the backlog of a 2x overload grows by `rate` requests a second, so by the end of
    # the run requests would wait about OVERLOAD_S seconds, well past this bound.
    bound = 2 * (ONGOING + QUEUED + 1) / rate + 0.5
    assert p99(admitted) < bound, f"p99 over {bound:.2f} s: {summary}"
    # Shedding is cheap: a refusal comes back quickly, without waiting for a slot.
    assert p99([r[0] for r in refused]) < bound, summary
    # After the overload (and the redeploy back) the server answers normally.
    answer = httpx.post(f"{server.http}/v1/models/tiny/predict", json=BODY, timeout=30)
    assert answer.status_code == 200, answer.text
