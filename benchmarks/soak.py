"""Soak: thousands of mixed good and bad requests across the three doors; none may be lost.

Starts its own Ray and espro app on loopback with a tiny random bundle, sends ``--requests``
requests (or as many as fit in ``--seconds``) from ``--concurrency`` client threads, round
robin over native JSON (httpx), OIP REST (httpx, JSON and binary) and OIP gRPC (grpcio with
``serving.proto`` stubs), about a third of them malformed, and writes a JSON report: requests
sent and answered, answers by status, answers that differ from what was expected, requests
lost (no answer at all: must be 0), latency percentiles of good requests by door, and the RSS
of the driver and every Ray process (read from ``/proc``) at the start and the end.

Run it in a network namespace with only loopback (Ray opens ports on every interface)::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
      unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/soak.py \\
      --requests 6000 --seconds 150 --out benchmarks/results/soak.json'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from bundles import simplex_bundle

from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc

WIDTH = 4


def random_bundle(path: Path, seed: int = 0) -> Path:
    """A 3-class MLP bundle for inputs of shape (4,): two random 2-simplexes, 3 draws each."""
    return simplex_bundle(
        path,
        name="soak",
        architecture="mlp",
        kwargs={"hidden": [16]},
        input_shape=(WIDTH,),
        num_outputs=3,
        simplexes=2,
        vertices=3,
        draws=3,
        seed=seed,
    )


# --------------------------------------------------------------------------- the traffic

Expect = int | str
"""An HTTP status, or the name of a gRPC status code."""


def rows(rng: np.random.Generator, batch: int, width: int = WIDTH) -> np.ndarray:
    return rng.normal(size=(batch, width)).astype(np.float32)


def native_cases(rng: np.random.Generator) -> list[tuple[str, str, bytes, Expect]]:
    """(kind, model, body, expected status) for the native door."""
    x = rows(rng, int(rng.integers(1, 9)))
    nan = x.copy()
    nan[0, 0] = np.nan
    return [
        ("good", "soak", json.dumps({"inputs": x.tolist()}).encode(), 200),
        ("good", "soak", json.dumps({"inputs": x.tolist(), "draws": 2}).encode(), 200),
        ("bad-shape", "soak", json.dumps({"inputs": rows(rng, 2, 3).tolist()}).encode(), 400),
        ("bad-nan", "soak", json.dumps({"inputs": nan.tolist()}).encode(), 400),
        ("bad-json", "soak", b'{"inputs": [[1, 2,', 400),
        ("bad-draws", "soak", json.dumps({"inputs": x.tolist(), "draws": 10**18}).encode(), 400),
        ("bad-model", "nope", json.dumps({"inputs": x.tolist()}).encode(), 404),
        ("bad-schema", "soak", b'{"inputs": []}', 422),
    ]


def rest_cases(rng: np.random.Generator) -> list[tuple[str, str, bytes, int | None, Expect]]:
    """(kind, model, body, Inference-Header-Content-Length, expected status) for OIP REST."""
    x = rows(rng, int(rng.integers(1, 9)))

    def header(datatype: str = "FP32", binary: int | None = None, **tensor: Any) -> bytes:
        spec = {"name": "input", "shape": list(x.shape), "datatype": datatype} | tensor
        if binary is not None:
            spec["parameters"] = {"binary_data_size": binary}
        return json.dumps({"inputs": [spec]}).encode()

    raw = x.tobytes()
    good_json = header(data=x.ravel().tolist())
    good_binary = header(binary=len(raw))
    return [
        ("good-json", "soak", good_json, None, 200),
        ("good-binary", "soak", good_binary + raw, len(good_binary), 200),
        ("bad-size", "soak", header(binary=len(raw) + 4) + raw, len(good_binary), 400),
        ("bad-header-length", "soak", good_binary + raw, 10**9, 400),
        ("bad-datatype", "soak", header("BF16", data=x.ravel().tolist()), None, 400),
        ("bad-count", "soak", header(data=[1.0, 2.0]), None, 400),
        ("bad-model", "nope", good_json, None, 404),
    ]


def grpc_cases(rng: np.random.Generator) -> list[tuple[str, pb.ModelInferRequest, Expect]]:
    """(kind, request, expected status code name) for OIP gRPC."""
    x = rows(rng, int(rng.integers(1, 9)))

    def request(model: str = "soak", shape: Any = None, raw: bytes | None = None, **params: Any):
        message = pb.ModelInferRequest(model_name=model)
        message.inputs.add(name="input", datatype="FP32", shape=shape or list(x.shape))
        message.raw_input_contents.append(x.tobytes() if raw is None else raw)
        for key, value in params.items():
            message.parameters[key].int64_param = value
        return message

    bytes_input = pb.ModelInferRequest(model_name="soak")
    tensor = bytes_input.inputs.add(name="input", datatype="BYTES", shape=[1, WIDTH])
    tensor.contents.bytes_contents.extend([b"x"] * WIDTH)
    return [
        ("good", request(), "OK"),
        ("good-draws", request(draws=1), "OK"),
        ("bad-shape", request(shape=[len(x), WIDTH + 1]), "INVALID_ARGUMENT"),
        ("bad-raw", request(raw=struct.pack("<f", 1.0)), "INVALID_ARGUMENT"),
        ("bad-draws", request(draws=-1), "INVALID_ARGUMENT"),
        ("bad-bytes", bytes_input, "INVALID_ARGUMENT"),
        ("bad-model", request(model="nope"), "NOT_FOUND"),
    ]


class Client:
    """One client thread's connections to the three doors."""

    def __init__(self, http: str, grpc_target: str) -> None:
        self.http = http
        self.session = httpx.Client(timeout=30)
        self.channel = grpc.insecure_channel(grpc_target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.session.close()
        self.channel.close()


def send(
    client: Client, i: int, rng: np.random.Generator
) -> tuple[str, str, Expect, Expect, float]:
    """Send request number ``i``: (door, kind, expected, got, seconds); ``got`` is ``"lost"``
    (with the exception's name in ``kind``) when no answer came back."""
    door = ("native", "rest", "grpc")[i % 3]
    start = time.perf_counter()
    try:
        if door == "native":
            cases = native_cases(rng)
            kind, model, body, expected = cases[int(rng.integers(len(cases)))]
            url = f"{client.http}/v1/models/{model}/predict"
            got: Expect = client.session.post(url, content=body).status_code
        elif door == "rest":
            cases = rest_cases(rng)
            kind, model, body, length, expected = cases[int(rng.integers(len(cases)))]
            headers = {} if length is None else {"Inference-Header-Content-Length": str(length)}
            url = f"{client.http}/v2/models/{model}/infer"
            got = client.session.post(url, content=body, headers=headers).status_code
        else:
            cases = grpc_cases(rng)
            kind, message, expected = cases[int(rng.integers(len(cases)))]
            try:
                client.stub.ModelInfer(message, timeout=30)
                got = "OK"
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                got = code.name
    except Exception as err:  # no answer: a timeout, a reset connection
        return door, type(err).__name__, "answer", "lost", time.perf_counter() - start
    return door, kind, expected, got, time.perf_counter() - start


# --------------------------------------------------------------------------- memory


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from ``/proc`` (Linux; psutil is not a
    dependency here)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """The user and system CPU seconds each of ``pids`` still running has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


def memory(root: int | None = None) -> dict[str, Any]:
    """RSS in MiB of process ``root`` (this driver by default) and every process it started
    (GCS, raylet, workers, replicas, proxy): the total, and per process name (Ray names
    workers ``ray::Actor``)."""
    by_name: dict[str, float] = {}
    total = 0.0
    for pid in descendants(os.getpid() if root is None else root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" not in fields:  # a zombie
            continue
        rss = int(fields["VmRSS"].split()[0]) / 1024
        name = cmdline.split()[0] if cmdline.startswith("ray::") else fields["Name"].strip()
        total += rss
        by_name[name] = round(by_name.get(name, 0.0) + rss, 1)
    return {"total_rss_mib": round(total, 1), "by_process_mib": dict(sorted(by_name.items()))}


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from serving import launch
    from serving.settings import AppConfig, LaunchConfig

    workdir = Path(tempfile.mkdtemp(prefix="espro-soak-"))
    bundle = random_bundle(workdir / "bundle")
    config = AppConfig(bundles=[str(bundle)], torch_threads=1, max_body_bytes=1 << 20)
    ports = LaunchConfig(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        num_cpus=args.ray_cpus,
    )
    launch.start(config, ports)
    http, grpc_target = f"http://127.0.0.1:{args.http_port}", f"127.0.0.1:{args.grpc_port}"
    try:
        warm = Client(http, grpc_target)
        rng = np.random.default_rng(args.seed)
        for i in range(30):  # every door once or more, before the baseline memory reading
            send(warm, i, rng)
        warm.close()
        time.sleep(1.0)
        memory_start = memory()

        lock = threading.Lock()
        next_index = [0]
        records: list[tuple[str, str, Expect, Expect, float]] = []
        deadline = time.monotonic() + args.seconds

        def worker(seed: int) -> None:
            client, rng = Client(http, grpc_target), np.random.default_rng(seed)
            try:
                while time.monotonic() < deadline:
                    with lock:
                        i = next_index[0]
                        if i >= args.requests:
                            return
                        next_index[0] += 1
                    record = send(client, i, rng)
                    with lock:
                        records.append(record)
            finally:
                client.close()

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for future in [pool.submit(worker, args.seed + 1 + t) for t in range(args.concurrency)]:
                future.result()
        elapsed = time.perf_counter() - started
        time.sleep(1.0)
        memory_end = memory()
        after = Client(http, grpc_target)
        still_answers = send(after, 0, np.random.default_rng(0))  # native; may be a bad case
        health = after.session.get(f"{http}/v2/health/ready").status_code
        after.close()
    finally:
        launch.stop()
    return report(args, records, elapsed, memory_start, memory_end, still_answers, health)


def report(
    args: argparse.Namespace,
    records: list[tuple[str, str, Expect, Expect, float]],
    elapsed: float,
    memory_start: dict[str, Any],
    memory_end: dict[str, Any],
    still_answers: tuple[str, str, Expect, Expect, float],
    health: int,
) -> dict[str, Any]:
    lost = [r for r in records if r[3] == "lost"]
    unexpected = Counter(f"{d} {k}: expected {e}, got {g}" for d, k, e, g, _ in records if e != g)
    by_door: dict[str, Any] = {}
    for door in ("native", "rest", "grpc"):
        mine = [r for r in records if r[0] == door]
        good = sorted(r[4] for r in mine if r[3] in (200, "OK"))
        by_door[door] = {
            "sent": len(mine),
            "answers": dict(Counter(str(r[3]) for r in mine)),
            "good_answered": len(good),
            "good_latency_ms": {
                "p50": round(1e3 * statistics.median(good), 1),
                "p99": round(1e3 * statistics.quantiles(good, n=100)[98], 1),
                "max": round(1e3 * good[-1], 1),
            }
            if len(good) > 1
            else None,
        }
    return {
        "command": "benchmarks/soak.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": round(elapsed, 1),
        "sent": len(records),
        "answered": len(records) - len(lost),
        "lost": len(lost),
        "lost_by_error": dict(Counter(r[1] for r in lost)),
        "requests_per_second": round(len(records) / elapsed, 1),
        "answers_by_code": dict(Counter(str(r[3]) for r in records if r[3] != "lost")),
        "unexpected_answers": dict(unexpected),
        "by_door": by_door,
        "after": {"request_status": str(still_answers[3]), "ready_status": health},
        "memory_start": memory_start,
        "memory_end": memory_end,
        "memory_growth_mib": round(memory_end["total_rss_mib"] - memory_start["total_rss_mib"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000, help="requests to send at most")
    parser.add_argument("--seconds", type=float, default=150.0, help="stop sending after this")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--http-port", type=int, default=18700)
    parser.add_argument("--grpc-port", type=int, default=19700)
    parser.add_argument("--metrics-port", type=int, default=18780)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    failed = (
        result["lost"] or result["unexpected_answers"] or result["after"]["ready_status"] != 200
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
