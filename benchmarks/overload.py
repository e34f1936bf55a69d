"""Overload: how long admitted requests wait when more arrive than the server can answer.

Starts its own Ray and espro app on loopback with a random MLP bundle, a small bounded queue
(``--ongoing`` requests per replica, ``--queued`` per proxy) and no batching. A closed loop of
``--ongoing`` clients measures the capacity for ``--probe-seconds``; then an open loop offers
``--factor`` times that rate for ``--seconds`` (a fixed arrival rate, whatever the answers do)
and the report gives the answers by status, requests lost (no answer: must be 0), and the
p50/p99 latency of admitted requests and of refusals, against the bound
``2 x (ongoing + queued + 1) / capacity + 0.5 s``: an admitted request has at most
``ongoing + queued`` requests ahead of it, each taking about 1/capacity, doubled with half a
second for the noise of shared cores. Without the queue bound the backlog would grow by
``capacity`` requests a second. tests/test_load.py checks what does not depend on speed.

Run it in a network namespace with only loopback (Ray opens ports on every interface)::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \\
      unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/overload.py \\
      --out benchmarks/results/overload.json'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from bundles import simplex_bundle

WIDTH = 16
BODY = {"inputs": [[0.5] * WIDTH]}


def post(client: httpx.Client, url: str) -> tuple[int | str, float, str | None]:
    """Status (or the exception's name when there was no answer), latency, Retry-After."""
    start = time.perf_counter()
    try:
        response = client.post(url, json=BODY)
    except httpx.HTTPError as err:
        return type(err).__name__, time.perf_counter() - start, None
    return response.status_code, time.perf_counter() - start, response.headers.get("retry-after")


def capacity(client: httpx.Client, url: str, clients: int, seconds: float) -> tuple[float, float]:
    """Requests per second answered by a closed loop of ``clients``, and the median latency."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def loop() -> None:
        while time.perf_counter() < stop:
            status, latency, _ = post(client, url)
            if status != 200:
                raise RuntimeError(f"the capacity probe got {status}")
            with lock:
                latencies.append(latency)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(loop) for _ in range(clients)]:
            future.result()
    return len(latencies) / (time.perf_counter() - start), statistics.median(latencies)


def p99(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from serving import launch
    from serving.settings import AppConfig, DeploymentOptions, LaunchConfig

    bundle = simplex_bundle(
        Path(tempfile.mkdtemp(prefix="espro-overload-")) / "bundle",
        name="overload",
        architecture="mlp",
        kwargs={"hidden": [args.hidden, args.hidden]},
        input_shape=(WIDTH,),
        num_outputs=10,
        simplexes=4,
        vertices=3,
        draws=args.draws,
    )
    config = AppConfig(
        bundles=[str(bundle)], max_batch_size=1, batch_wait_timeout_s=0.0, torch_threads=1
    )
    deployment = DeploymentOptions(
        max_ongoing_requests=args.ongoing, max_queued_requests=args.queued
    )
    ports = LaunchConfig(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        num_cpus=args.ray_cpus,
    )
    launch.start(config, ports, deployment)
    url = f"http://127.0.0.1:{args.http_port}/v1/models/overload/predict"
    try:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        with httpx.Client(timeout=30, limits=limits) as client:
            post(client, url)  # warm up the route and the connection pool
            rate, service_time = capacity(client, url, args.ongoing, args.probe_seconds)
            interval = 1 / (args.factor * rate)
            with ThreadPoolExecutor(args.threads) as pool:
                futures = []
                start = time.perf_counter()
                while (now := time.perf_counter()) < start + args.seconds:
                    futures.append(pool.submit(post, client, url))
                    time.sleep(max(0.0, start + len(futures) * interval - now))
                answers = [future.result() for future in futures]
    finally:
        launch.stop()

    admitted = [latency for status, latency, _ in answers if status == 200]
    refused = [latency for status, latency, _ in answers if status == 503]
    bound = 2 * (args.ongoing + args.queued + 1) / rate + 0.5
    admitted_p99, refused_p99 = p99(admitted), p99(refused)
    return {
        "command": "benchmarks/overload.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "capacity_per_s": round(rate, 1),
        "service_median_ms": ms(service_time),
        "offered_per_s": round(len(answers) / args.seconds, 1),
        "sent": len(answers),
        "answers_by_status": dict(Counter(str(status) for status, _, _ in answers)),
        "lost": sum(not isinstance(status, int) for status, _, _ in answers),
        "refusals_without_retry_after": sum(
            status == 503 and retry is None for status, _, retry in answers
        ),
        "admitted_p50_ms": ms(statistics.median(admitted)) if admitted else None,
        "admitted_p99_ms": ms(admitted_p99),
        "refused_p99_ms": ms(refused_p99),
        "bound_ms": ms(bound),
        "admitted_p99_within_bound": None if admitted_p99 is None else admitted_p99 < bound,
        "refused_p99_within_bound": None if refused_p99 is None else refused_p99 < bound,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ongoing", type=int, default=2, help="max_ongoing_requests")
    parser.add_argument("--queued", type=int, default=4, help="max_queued_requests")
    parser.add_argument("--probe-seconds", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of overload")
    parser.add_argument("--factor", type=float, default=2.0, help="offered rate / capacity")
    parser.add_argument("--threads", type=int, default=128, help="client threads")
    parser.add_argument("--hidden", type=int, default=512, help="width of the MLP's layers")
    parser.add_argument("--draws", type=int, default=16, help="members per simplex (of 4)")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--http-port", type=int, default=18900)
    parser.add_argument("--grpc-port", type=int, default=19900)
    parser.add_argument("--metrics-port", type=int, default=18980)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    failed = result["lost"] or set(result["answers_by_status"]) - {"200", "503"}
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
