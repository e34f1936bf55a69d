"""Serving benchmark: closed-loop load over every door, against the in-process engine, the espro
server and two peer servers, in one run.

The bundles (``--models``) take 3×32×32 inputs and have 10 classes and 3 simplexes × 5 draws =
15 members of random weights: ``cnn`` (channels (32, 64), hidden 128) and ``resnet18``
(torchvision's ResNet-18 with the CIFAR stem, every member with BatchNorm statistics of its own).
For every model, concurrency and request size (images per request), each target gets the same
load:

- ``engine``: :class:`serving.predictor.Predictor` called in this process, back to back, on
  the batch the server would form: ``min(concurrency, max_batch_size)`` requests of that size
  (``max_batch_size`` counts requests, as the server's batcher does), with the replicas' torch
  threads. Its images/s is the capacity the server's doors and batching can at best deliver.
- ``espro``: the server (``serving.launch.start``), every model in one application, with each
  ``--engines`` back end (default ``auto``, the server's): native JSON, OIP REST JSON, OIP REST
  with the binary tensor extension and OIP gRPC through Serve's proxy, and the replica's direct
  doors past it: ``native-direct``, ``rest-json-direct`` and ``rest-binary-direct`` (the same
  HTTP requests to the replica's own HTTP server) and ``grpc-direct`` (its own gRPC server).
- ``kserve``: ``benchmarks/kserve_peer.py`` (KServe's ``ModelServer``, one forward pass per
  member per request, no batching across requests).
- ``mlserver``: ``benchmarks/mlserver_peer.py`` (Seldon MLServer with its adaptive batching,
  running espro's own ``Predictor`` with each ``--engines`` back end).
- ``serve-noop``: a Ray Serve application that answers "ok" without a model, on the same Serve
  after espro's cells, under the one-image HTTP load: what Serve's proxy and replica path alone
  allow on this machine.

A peer runs in its own virtual environment (``.venv-kserve``, ``.venv-mlserver``: without it
its cells are skipped with the reason), one model at a time, over the OIP doors it has; each
espro direct door is compared with the peer's door of the same requests, and a door that fails
its first request has its cells recorded as skipped with the answer (MLServer's REST binary).

The load generator runs in its own process pinned to one core: N workers, each sending its next
request when the previous answer arrives, for ``--warmup`` seconds and then ``--duration``
seconds in which answers are counted (requests still in flight at the end are awaited and
counted as sent, not as throughput). A cell reports requests/s, images/s, p50/p99 latency, the
errors by code (all phases), and the load generator's CPU use (100 % = its core saturated).
The in-process engine runs first and sets each model's cells: a cell's window lasts at least
four rounds (every worker answered once) at the engine's rate, its warm-up one, so a slow model
gets longer cells rather than a window with one answer in it; a cell whose rounds would outlast
``--max-window`` is recorded as skipped with its round's length. Run it where Ray may open
ports, i.e. in a loopback-only network namespace::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/serving_load.py'

``--quick`` runs tiny cells (1 s windows): about 3 minutes on 2 cores with both peers. The
default grid is 4 concurrencies × 2 request sizes over eight doors and both peers, for ``cnn``;
``--models cnn resnet18`` adds the ResNet-18, whose cells on a small CPU last up to a minute.
``--device cuda`` runs the engine, espro's replica and the peers on the GPU
(``benchmarks/gpu_serving.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import torch
from bundles import simplex_bundle
from engine import commit, machine
from soak import cpu_seconds, descendants, memory
from tqdm import tqdm

from serving.predictor import Predictor
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.settings import AppConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOORS = (
    "native",
    "native-direct",
    "rest-json",
    "rest-json-direct",
    "rest-binary",
    "rest-binary-direct",
    "grpc",
    "grpc-direct",
)
DIRECT_DOORS = {
    "native-direct": "native",
    "rest-json-direct": "rest-json",
    "rest-binary-direct": "rest-binary",
    "grpc-direct": "grpc",
}
"""espro's doors past Serve's proxy, each sending the requests of the door it names to the
replica's own server; a peer's door of those requests is their peer."""
MAX_BATCH_SIZE = AppConfig.model_fields["max_batch_size"].default
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
OK_CODES = {"200", "OK"}

ARCHITECTURES = {"cnn": {"channels": [32, 64], "hidden": 128}, "resnet18": {"small_input": True}}
"""The models (``--models``): each is its architecture's name, with these kwargs."""
INPUT_SHAPE = (3, 32, 32)
SIMPLEXES, VERTICES, DRAWS = 3, 3, 5

Cell = dict[str, Any]


# --------------------------------------------------------------------------- the bundles


def bundle_name(model: str) -> str:
    """The name ``model``'s bundle is served under."""
    return f"{model}-reference"


def reference_bundle(path: Path, model: str, seed: int = 0) -> Path:
    """``model`` with 3 simplexes × 5 draws = 15 members, written to ``path``."""
    return simplex_bundle(
        path,
        name=bundle_name(model),
        architecture=model,
        kwargs=ARCHITECTURES[model],
        input_shape=INPUT_SHAPE,
        num_outputs=10,
        simplexes=SIMPLEXES,
        vertices=VERTICES,
        draws=DRAWS,
        seed=seed,
    )


@dataclass(frozen=True)
class Peer:
    """A peer server: ``benchmarks/{name}_peer.py`` run by ``.venv-{name}``'s Python (as
    ``benchmarks/{name}-requirements.txt`` says), serving one bundle over OIP REST and gRPC."""

    name: str
    title: str
    """Its name in the tables."""
    http_port: int
    grpc_port: int
    no_native: str
    """Why it has no espro native API."""
    engine: str | None = None
    """How it computes, when it has a way of its own; None: it runs espro's engines, each of
    ``--engines`` in turn (``--engine E``)."""

    @property
    def unsupported(self) -> dict[str, str]:
        """The doors it lacks, and why."""
        direct = {
            door: f"{self.title} has no proxy in front: its {base} cells are the peer of "
            f"espro's {base} and {door}"
            for door, base in DIRECT_DOORS.items()
        }
        return direct | {"native": self.no_native, "native-direct": self.no_native}

    def engines(self, args: argparse.Namespace) -> list[str]:
        """The engines it runs, in turn."""
        return [self.engine] if self.engine else list(args.engines)


PEERS = (
    Peer(
        "kserve",
        "KServe",
        28500,
        28501,
        no_native="KServe has no espro native API (its v1 protocol, `:predict` with "
        "`instances`, is another contract)",
        engine="member-loop",
    ),
    Peer("mlserver", "MLServer", 28600, 28601, no_native="MLServer has no espro native API"),
)
TARGET_NAMES = ("engine", "espro", *(peer.name for peer in PEERS))


# --------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Endpoint:
    """Where a target's doors listen and the model they serve."""

    http: str
    grpc: str
    model: str
    input_shape: tuple[int, ...]
    direct: str | None = None
    """espro's direct gRPC door (``grpc-direct``), ``host:port``."""
    direct_http: str | None = None
    """espro's direct HTTP door (the ``-direct`` HTTP doors), ``http://host:port``."""


@dataclass(frozen=True)
class Timing:
    """How long a cell lasts: warm-up, then the measured window; a request's time limit."""

    warmup_s: float
    duration_s: float
    timeout_s: float


@dataclass(frozen=True)
class Load:
    """One cell's traffic: a door of an endpoint, N closed-loop workers, requests of a size."""

    endpoint: Endpoint
    timing: Timing
    door: str
    concurrency: int
    images: int

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Load:
        """The load :func:`dataclasses.asdict` made ``fields`` of."""
        endpoint = Endpoint(**fields.pop("endpoint"))
        return cls(endpoint, Timing(**fields.pop("timing")), **fields)


Answer = tuple[str, bytes]
"""A status (``"200"``, ``"OK"``, ``"503"``, ``"UNAVAILABLE"``) and the body or details."""


def instances(load: Load) -> np.ndarray:
    """The raw instances every request of ``load`` carries."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((load.images, *load.endpoint.input_shape), dtype=np.float32)


def route(load: Load) -> tuple[str, str | None]:
    """The door whose requests ``load`` sends (a direct door's base door) and where to."""
    endpoint, door = load.endpoint, DIRECT_DOORS.get(load.door, load.door)
    direct = load.door in DIRECT_DOORS
    if door == "grpc":
        return door, endpoint.direct if direct else endpoint.grpc
    return door, endpoint.direct_http if direct else endpoint.http


def http_request(load: Load, x: np.ndarray) -> tuple[str, bytes, dict[str, str]]:
    """URL, body and headers of a native or OIP REST request carrying ``x``."""
    door, base = route(load)
    if door == "native":
        body = json.dumps({"inputs": x.tolist()}).encode()
        url = f"{base}/v1/models/{load.endpoint.model}/predict"
        return url, body, {"content-type": "application/json"}
    url = f"{base}/v2/models/{load.endpoint.model}/infer"
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if door == "rest-json":
        body = json.dumps({"inputs": [tensor | {"data": x.ravel().tolist()}]}).encode()
        return url, body, {"content-type": "application/json"}
    raw = x.tobytes()
    header = json.dumps(
        {
            "inputs": [tensor | {"parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
    return url, header + raw, headers


def grpc_request(load: Load, x: np.ndarray) -> bytes:
    """A serialised ``ModelInferRequest`` carrying ``x`` as raw contents."""
    request = pb.ModelInferRequest(model_name=load.endpoint.model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


@contextlib.asynccontextmanager
async def sender(load: Load) -> AsyncIterator[Callable[[], Awaitable[Answer]]]:
    """A function sending ``load``'s request once: over one gRPC channel shared by the
    workers, or over HTTP/1.1 with a client and connection per worker. (One httpx client
    shared by 128 workers cost the load generator 21 ms of CPU per request in its pool
    handling, encode/httpx#3215, and the cell measured the load generator.)"""
    x = instances(load)
    door, address = route(load)
    if door == "grpc":
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(MODEL_INFER)  # bytes in, bytes out: no decoding here
            body = grpc_request(load, x)

            async def send_grpc() -> Answer:
                try:
                    return "OK", await call(body, timeout=load.timing.timeout_s)
                except grpc.aio.AioRpcError as err:
                    return err.code().name, (err.details() or "").encode()

            yield send_grpc
        return
    url, body, headers = http_request(load, x)
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as clients:
        idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for _ in range(load.concurrency):
            client = httpx.AsyncClient(timeout=load.timing.timeout_s, limits=one)
            idle.put_nowait(await clients.enter_async_context(client))

        async def send_http() -> Answer:
            client = idle.get_nowait()  # as many clients as workers: never empty
            try:
                response = await client.post(url, content=body, headers=headers)
            finally:
                idle.put_nowait(client)
            return str(response.status_code), response.content

        yield send_http


async def probe(load: Load) -> dict[str, Any]:
    """Send ``load``'s request once: whether it was answered, and how."""
    async with sender(load) as send:
        try:
            code, body = await send()
        except Exception as err:  # no answer at all
            code, body = type(err).__name__, str(err).encode()
    return {"ok": code in OK_CODES, "code": code, "detail": body[:300].decode(errors="replace")}


async def closed_loop(load: Load) -> dict[str, Any]:
    """Run ``load``: its workers send back to back through warm-up and the window, then await
    their last answers; the cell's statistics."""
    async with sender(load) as send:
        records: list[tuple[float, float, str]] = []
        started, cpu = time.perf_counter(), time.process_time()
        end = started + load.timing.warmup_s + load.timing.duration_s

        async def worker() -> None:
            while (begin := time.perf_counter()) < end:
                try:
                    code, _ = await send()
                except Exception as err:  # no answer: a timeout, a refused connection
                    code = type(err).__name__
                records.append((begin, time.perf_counter(), code))

        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return summarise(load, records, (end - load.timing.duration_s, end)) | {
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_percent": round(100 * cpu / wall, 1),
    }


def percentiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """The p50 and p99 of ``seconds``, in milliseconds."""
    p50, p99 = np.percentile(seconds, [50, 99]) * 1e3
    return float(p50), float(p99)


def summarise(
    load: Load, records: list[tuple[float, float, str]], window: tuple[float, float]
) -> dict[str, Any]:
    """Throughput and latency of the answers that arrived in ``window``; counts of all."""
    latencies = [
        finish - begin
        for begin, finish, code in records
        if code in OK_CODES and window[0] <= finish <= window[1]
    ]
    errors = Counter(code for _, _, code in records if code not in OK_CODES)
    seconds = window[1] - window[0]
    p50, p99 = percentiles_ms(latencies) if latencies else (None, None)
    return {
        "seconds": round(seconds, 3),
        "requests": len(latencies),
        "images": len(latencies) * load.images,
        "requests_per_s": len(latencies) / seconds,
        "images_per_s": len(latencies) * load.images / seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "sent": len(records),
        "ok": len(records) - errors.total(),
        "errors": dict(errors),
    }


def loadgen_worker() -> None:
    """The load generator's process: it answers each JSON line on stdin
    (``{"probe": bool, "load": {...}}``) with one JSON line on stdout."""
    for line in sys.stdin:
        message = json.loads(line)
        load = Load.from_dict(message["load"])
        result = asyncio.run(probe(load) if message["probe"] else closed_loop(load))
        print(json.dumps(result), flush=True)


class LoadGenerator:
    """The load generator's process (this file with ``--loadgen-worker``) pinned to one core;
    it runs one load at a time."""

    def __init__(self, core: int) -> None:
        self.core = core
        command = [sys.executable, str(Path(__file__).resolve()), "--loadgen-worker"]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:  # pinned at once, before it starts a thread: its threads inherit the core
            os.sched_setaffinity(self.process.pid, {core})
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the process: end of input, then a kill if it does not exit."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _ask(self, load: Load, probe: bool) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"probe": probe, "load": asdict(load)}) + "\n")
        self.process.stdin.flush()
        timing = load.timing
        limit = 60 + timing.warmup_s + timing.duration_s + timing.timeout_s  # 60 s: start-up
        if not select.select([self.process.stdout], [], [], limit)[0]:
            raise TimeoutError(f"the load generator gave no answer in {limit:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited with {self.process.wait()}")
        return json.loads(line)

    def probe(self, load: Load) -> dict[str, Any]:
        """Send one request of ``load``."""
        return self._ask(load, probe=True)

    def run(self, load: Load) -> dict[str, Any]:
        """Run one closed-loop cell."""
        return self._ask(load, probe=False)


# --------------------------------------------------------------------------- the cells


@dataclass(frozen=True)
class GridCell:
    """A concurrency and request size, or why it is not run."""

    concurrency: int
    images: int
    skipped: str | None = None
    timing: Timing | None = None
    """Its own warm-up, window and time limit (see :func:`fitted`); None: the run's."""

    @property
    def batch_rows(self) -> int:
        """The rows of the batches the server forms under this cell's load."""
        return min(self.concurrency, MAX_BATCH_SIZE) * self.images

    def round_s(self, images_per_s: float) -> float:
        """How long one round takes (every worker's request answered once) at a rate."""
        return self.concurrency * self.images / images_per_s


def grid(concurrencies: Sequence[int], sizes: Sequence[int]) -> list[GridCell]:
    """Every (concurrency, images per request)."""
    return [GridCell(concurrency, images) for images in sizes for concurrency in concurrencies]


ROUNDS = 4
"""A cell's window holds at least this many rounds at the in-process engine's rate."""


def too_long(cell: GridCell, images_per_s: float, max_window_s: float) -> str | None:
    """Why ``cell`` is not run when the engine answers ``images_per_s``: its rounds would
    outlast ``max_window_s``; None when they do not."""
    round_s = cell.round_s(images_per_s)
    if ROUNDS * round_s <= max_window_s:
        return None
    return (
        f"one round of {cell.concurrency * cell.images} images takes {round_s:.1f} s at the "
        f"engine's {images_per_s:.1f} images/s: {ROUNDS} rounds outlast --max-window "
        f"{max_window_s:g} s"
    )


def fitted(
    cells: Sequence[GridCell], rates: dict[int, float], timing: Timing, max_window_s: float
) -> list[GridCell]:
    """``cells`` timed for a model whose engine answers ``rates[batch_rows]`` images/s (a
    batch it did not run: its fastest rate): each window holds :data:`ROUNDS` rounds and the
    warm-up one (the run's timing where that is longer); a cell whose rounds outlast
    ``max_window_s`` is skipped with the reason."""
    results = []
    for cell in cells:
        rate = rates.get(cell.batch_rows, max(rates.values()))
        why = too_long(cell, rate, max_window_s)
        if why:
            results.append(replace(cell, skipped=why))
            continue
        round_s = cell.round_s(rate)
        own = Timing(
            max(timing.warmup_s, round_s),
            max(timing.duration_s, ROUNDS * round_s),
            max(timing.timeout_s, 3 * round_s),
        )
        results.append(replace(cell, timing=own))
    return results


def label(target: str, model: str, engine: str, door: str, cell: GridCell) -> Cell:
    """The fields that name a cell."""
    return {
        "target": target,
        "model": model,
        "engine": engine,
        "door": door,
        "concurrency": cell.concurrency,
        "images_per_request": cell.images,
    }


def engine_capacity(predictor: Predictor, rows: int, timing: Timing) -> dict[str, Any]:
    """Images/s of ``predictor.predict`` on batches of ``rows`` run back to back (warm-up
    first; at least 3 timed calls), and the p50/p99 of one call."""
    shape = predictor.manifest.input.shape
    x = torch.randn(rows, *shape, generator=torch.Generator().manual_seed(0))
    warm_until = time.perf_counter() + timing.warmup_s
    predictor.predict(x)
    while time.perf_counter() < warm_until:
        predictor.predict(x)
    times: list[float] = []
    end = time.perf_counter() + timing.duration_s
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        predictor.predict(x)
        times.append(time.perf_counter() - start)
    p50, p99 = percentiles_ms(times)
    return {
        "batch_rows": rows,
        "calls": len(times),
        "seconds": round(sum(times), 3),
        "images": rows * len(times),
        "images_per_s": rows * len(times) / sum(times),
        "p50_ms": p50,
        "p99_ms": p99,
    }


def engine_cells(
    bundle: Path,
    model: str,
    engine: str,
    cells: Sequence[GridCell],
    timing: Timing,
    report: Callable[[Cell], None],
    *,
    device: str = "cpu",
    max_window_s: float = float("inf"),
) -> list[Cell]:
    """The in-process engine at the batch the server would form for every cell (each batch
    size measured once, the smallest first). A cell whose rounds would outlast
    ``max_window_s`` at the fastest rate measured so far is skipped (see :func:`too_long`)."""
    predictor = Predictor.from_path(bundle, engine=engine, device=device)
    measured: dict[int, dict[str, Any]] = {}
    results: dict[GridCell, Cell] = {}
    for cell in sorted(cells, key=lambda cell: cell.batch_rows):
        result = label("engine", model, engine, "in-process", cell)
        fastest = max((m["images_per_s"] for m in measured.values()), default=None)
        why = too_long(cell, fastest, max_window_s) if fastest else None
        if why:
            result["skipped"] = why
        else:
            if cell.batch_rows not in measured:
                measured[cell.batch_rows] = engine_capacity(predictor, cell.batch_rows, timing)
            capacity = measured[cell.batch_rows]
            result |= capacity | {
                "requests": capacity["images"] / cell.images,
                "requests_per_s": capacity["images_per_s"] / cell.images,
            }
        report(result)
        results[cell] = result
    return [results[cell] for cell in cells]


def engine_rates(cells: Sequence[Cell], model: str) -> dict[int, float]:
    """The in-process engine's images/s per batch rows for ``model``: the slowest engine's."""
    rates: dict[int, float] = {}
    for cell in cells:
        if cell["target"] == "engine" and cell["model"] == model and "images_per_s" in cell:
            rows, rate = cell["batch_rows"], cell["images_per_s"]
            rates[rows] = min(rate, rates.get(rows, rate))
    return rates


Processes = Callable[[], Iterable[int]]
"""The pids of a target's server processes, looked up when called."""


def ray_processes(loadgen: LoadGenerator) -> list[int]:
    """Every process this driver started but the load generator: Ray's and Serve's, espro's
    replica among them."""
    others = {os.getpid(), *descendants(loadgen.process.pid)}
    return [pid for pid in descendants(os.getpid()) if pid not in others]


def server_cpu_ms(load: Callable[[], Cell], server: Processes) -> Cell:
    """``load``'s cell with the CPU its server's processes used per request sent (warm-up
    included), in milliseconds: what the answers cost, apart from the machine's speed."""
    before = cpu_seconds(server())
    result = load()
    after = cpu_seconds(server())
    used = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
    return result | {"server_cpu_ms_per_request": 1e3 * used / max(result["sent"], 1)}


def door_cells(
    loadgen: LoadGenerator,
    target: str,
    model: str,
    engine: str,
    endpoint: Endpoint,
    doors: Sequence[str],
    cells: Sequence[GridCell],
    timing: Timing,
    report: Callable[[Cell], None],
    unsupported: dict[str, str] | None = None,
    server: Processes | None = None,
) -> list[Cell]:
    """Every cell over every door of one running target, with the CPU per request of its
    ``server`` processes where given. A door that is ``unsupported`` or does not answer a
    first request has its cells recorded with the reason instead."""
    results = []
    for door in doors:
        why = (unsupported or {}).get(door)
        if why is None:
            first = loadgen.probe(make_load(endpoint, door, GridCell(1, 1), timing))
            why = None if first["ok"] else f"the door answers {first['code']}: {first['detail']}"
        for cell in cells:
            result = label(target, model, engine, door, cell)
            if cell.skipped or why:
                result["skipped"] = cell.skipped or why
            else:
                load = make_load(endpoint, door, cell, timing)
                run = functools.partial(loadgen.run, load)
                result |= server_cpu_ms(run, server) if server else run()
            report(result)
            results.append(result)
    return results


def skipped_cells(
    target: str,
    model: str,
    engines: Sequence[str],
    doors: Sequence[str],
    cells: Sequence[GridCell],
    why: str,
    report: Callable[[Cell], None],
) -> list[Cell]:
    """Every cell of a target that cannot run, with the reason."""
    results = [
        label(target, model, engine, door, cell) | {"skipped": cell.skipped or why}
        for engine in engines
        for door in doors
        for cell in cells
    ]
    for result in results:
        report(result)
    return results


def make_load(endpoint: Endpoint, door: str, cell: GridCell, timing: Timing) -> Load:
    """The traffic of one cell of ``endpoint``'s ``door``, with the cell's own timing if it
    has one, else ``timing``."""
    return Load(endpoint, cell.timing or timing, door, cell.concurrency, cell.images)


# --------------------------------------------------------------------------- the targets


def espro_cells(
    args: argparse.Namespace,
    bundles: dict[str, Path],
    loadgen: LoadGenerator,
    plans: dict[str, list[GridCell]],
    timing: Timing,
    report: Callable[[Cell], None],
) -> tuple[list[Cell], dict[str, Any]]:
    """The espro server on loopback serving every model, each engine in turn (a redeploy
    between them); its cells and the memory of its processes (this driver's included, the
    load generator's apart)."""
    from serving import launch
    from serving.settings import DeploymentOptions, LaunchConfig

    def config(engine: str) -> AppConfig:
        return AppConfig(
            bundles=[str(bundle) for bundle in bundles.values()],
            engine=engine,
            device=args.device,
            torch_threads=args.threads,
            direct_grpc_port=args.direct_grpc_port,
            direct_http_port=args.direct_http_port,
            batch_wait_timeout_s=args.batch_wait_ms / 1000,
        )

    ports = LaunchConfig(
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port
    )
    endpoints = {
        model: Endpoint(
            f"http://127.0.0.1:{args.http_port}",
            f"127.0.0.1:{args.grpc_port}",
            bundle_name(model),
            INPUT_SHAPE,
            direct=f"127.0.0.1:{args.direct_grpc_port}",
            direct_http=f"http://127.0.0.1:{args.direct_http_port}",
        )
        for model in bundles
    }
    results: list[Cell] = []
    launch.start(config(args.engines[0]), ports, DeploymentOptions(num_cpus=args.threads))
    try:
        for k, engine in enumerate(args.engines):
            if k:
                launch.deploy(config(engine))
            for model, endpoint in endpoints.items():
                results += door_cells(
                    loadgen, "espro", model, engine, endpoint, args.doors, plans[model], timing,
                    report, server=functools.partial(ray_processes, loadgen),
                )  # fmt: skip
        cells = grid(args.concurrency, args.images)
        results += serve_ceiling_cells(endpoints[args.models[0]], loadgen, cells, timing, report)
        info = {
            "memory": memory(),
            "loadgen_rss_mib": memory(loadgen.process.pid)["total_rss_mib"],
        }
    finally:
        launch.stop()
    return results, info


def serve_ceiling_cells(
    endpoint: Endpoint,
    loadgen: LoadGenerator,
    cells: Sequence[GridCell],
    timing: Timing,
    report: Callable[[Cell], None],
) -> list[Cell]:
    """Ray Serve's own ceiling on this machine: a second application on the running Serve whose
    one replica reads each request's body and answers "ok", under the one-image HTTP cells
    (the ``native`` door's requests), behind the same proxy as espro."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=256)
    class NoOp:
        async def __call__(self, request: Any) -> str:
            await request.body()
            return "ok"

    one_image = [cell for cell in cells if cell.images == 1]
    serve.run(NoOp.bind(), name="noop", route_prefix="/noop")
    try:
        noop = Endpoint(f"{endpoint.http}/noop", endpoint.grpc, "noop", endpoint.input_shape)
        return door_cells(
            loadgen, "serve-noop", "none", "none", noop, ["native"], one_image, timing, report,
            server=functools.partial(ray_processes, loadgen),
        )  # fmt: skip
    finally:
        serve.delete("noop")


@contextlib.contextmanager
def running(command: list[str], endpoint: Endpoint, log: Path) -> Iterator[int]:
    """``command``, a peer serving ``endpoint``, running until the block ends; yields its pid
    once the model is ready."""
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"{endpoint.http}/v2/models/{endpoint.model}/ready"
        deadline = time.monotonic() + 600  # auto times its engines, an ONNX export included
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[1]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def peer_cells(
    args: argparse.Namespace,
    peer: Peer,
    model: str,
    bundle: Path,
    loadgen: LoadGenerator,
    cells: Sequence[GridCell],
    timing: Timing,
    report: Callable[[Cell], None],
) -> tuple[list[Cell], dict[str, Any]]:
    """A peer's cells on one model, each of its engines in turn (skipped with the reason when
    its venv is missing); per engine, the memory of its processes and how far its
    probabilities are from espro's."""
    python, http_port, grpc_port = (
        getattr(args, f"{peer.name}_{option}") for option in ("python", "http_port", "grpc_port")
    )
    engines = peer.engines(args)
    if not Path(python).exists():
        why = f"no {python}: create it as benchmarks/{peer.name}-requirements.txt says"
        return skipped_cells(peer.name, model, engines, args.doors, cells, why, report), {}
    endpoint = Endpoint(
        f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", bundle_name(model), INPUT_SHAPE
    )
    command = [python, str(HERE / f"{peer.name}_peer.py"), str(bundle)]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--threads", str(args.threads), "--device", args.device]
    wait_ms = str(args.batch_wait_ms)
    results: list[Cell] = []
    info = {}
    for engine in engines:
        # A peer running espro's engines batches too: it waits as long as espro's batcher.
        own = [] if peer.engine else ["--engine", engine, "--max-batch-time-ms", wait_ms]
        log = bundle.parent / f"{peer.name}-{model}-{engine}.log"
        with running(command + own, endpoint, log) as pid:
            difference = probability_difference(endpoint, bundle, timing)
            results += door_cells(
                loadgen, peer.name, model, engine, endpoint, args.doors, cells, timing, report,
                unsupported=peer.unsupported, server=functools.partial(descendants, pid),
            )  # fmt: skip
            info[engine] = {"memory": memory(pid), "max_probability_difference": difference}
    return results, info


def probability_difference(endpoint: Endpoint, bundle: Path, timing: Timing) -> float:
    """The largest difference between the ``probabilities`` a target answers over gRPC and
    :class:`Predictor`'s for the same instances: the peer must serve the same members."""
    load = make_load(endpoint, "grpc", GridCell(1, 4), timing)
    x = instances(load)
    with grpc.insecure_channel(endpoint.grpc) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        response = infer(pb.ModelInferRequest.FromString(grpc_request(load, x)), timeout=30)
    names = [output.name for output in response.outputs]
    raw = response.raw_output_contents[names.index("probabilities")]
    theirs = np.frombuffer(raw, np.float32).reshape(len(x), -1)
    ours = Predictor.from_path(bundle).predict(torch.from_numpy(x)).probs.numpy()
    return float(np.abs(theirs - ours).max())


# --------------------------------------------------------------------------- the report

TARGETS = (
    ("1 image per request, c=32: >= 65% of the in-process engine", 1, 32, "engine", 0.65),
    ("1 image per request, c=32: >= 1.5x the KServe peer, p99 no worse", 1, 32, "kserve", 1.5),
    ("1 image per request, c=32: >= 1.0x the MLServer peer", 1, 32, "mlserver", 1.0),
    ("1 image per request, c=32: REST binary >= 0.8x Serve gRPC", 1, 32, "grpc", 0.8),
    ("16 images per request, c=8: >= 85% of the in-process engine", 16, 8, "engine", 0.85),
    ("1 image per request, c=128: >= 90% of c=32, no errors", 1, 128, "c32", 0.9),
)  # fmt: skip
"""The serving targets: text, images per request, concurrency, the baseline, the ratio.
Against Serve gRPC (espro's ``grpc`` door) only the REST binary doors are held."""
KEY = ("target", "model", "engine", "door", "concurrency", "images_per_request")
"""The fields that tell a cell from the others."""


def _ratio(numerator: float, denominator: float | None) -> float | None:
    return numerator / denominator if denominator else None


def ratios(cells: Sequence[Cell]) -> list[Cell]:
    """For every measured espro cell: its images/s over the in-process engine's (same model,
    engine, concurrency and request size), over each peer's (same door, the door of the same
    requests for a direct one; the peer's own engine or the same), over espro's ``grpc``
    door's and over its own at c = 32 (same model, engine and size; same door for c = 32),
    p99s side by side, and for one-image cells its requests/s over Serve's no-op ceiling
    (same concurrency)."""
    measured = {tuple(c[k] for k in KEY): c for c in cells if "images_per_s" in c}
    results = []
    for (target, model, engine, door, concurrency, images), c in measured.items():
        if target != "espro":
            continue
        base = measured.get(("engine", model, engine, "in-process", concurrency, images), {})
        grpc_door = measured.get(("espro", model, engine, "grpc", concurrency, images), {})
        c32 = measured.get(("espro", model, engine, door, 32, images), {})
        ceiling = measured.get(("serve-noop", "none", "none", "native", concurrency, images), {})
        row = {key: c[key] for key in KEY[1:]} | {
            "server_images_per_s": c["images_per_s"],
            "engine_images_per_s": base.get("images_per_s"),
            "server_over_engine": _ratio(c["images_per_s"], base.get("images_per_s")),
            "server_over_grpc": _ratio(c["images_per_s"], grpc_door.get("images_per_s")),
            "server_over_c32": _ratio(c["images_per_s"], c32.get("images_per_s")),
            "errors": c["errors"],
            "server_p99_ms": c["p99_ms"],
            "serve_noop_requests_per_s": ceiling.get("requests_per_s"),
            "server_over_serve_noop": _ratio(c["requests_per_s"], ceiling.get("requests_per_s")),
        }
        for peer in PEERS:
            key = (peer.name, model, peer.engine or engine, DIRECT_DOORS.get(door, door))
            theirs = measured.get((*key, concurrency, images), {})
            row |= {
                f"{peer.name}_images_per_s": theirs.get("images_per_s"),
                f"server_over_{peer.name}": _ratio(c["images_per_s"], theirs.get("images_per_s")),
                f"{peer.name}_p99_ms": theirs.get("p99_ms"),
            }
        results.append(row)
    return results


def targets(rows: Sequence[Cell]) -> list[Cell]:
    """Each serving target, per model, engine and door where its cells were measured."""
    results = []
    for text, images, concurrency, baseline, threshold in TARGETS:
        for row in rows:
            if (row["images_per_request"], row["concurrency"]) != (images, concurrency):
                continue
            if baseline == "grpc" and DIRECT_DOORS.get(row["door"], row["door"]) != "rest-binary":
                continue  # a REST binary target
            value = row[f"server_over_{baseline}"]
            met = value is not None and value >= threshold
            if baseline == "kserve":  # and p99 no worse
                met = met and row["server_p99_ms"] <= row["kserve_p99_ms"]
            if baseline == "c32":
                met = met and not row["errors"]
            results.append(
                {"target": text, "model": row["model"], "engine": row["engine"]}
                | {"door": row["door"], "ratio": value, "met": met if value is not None else None}
            )
    return results


def _number(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def cell_row(cell: Cell) -> str:
    """One printed line per cell."""
    name = (
        f"{cell['target']:10} {cell['model']:8} {cell['engine']:11} {cell['door']:18} "
        f"c={cell['concurrency']:<3} i={cell['images_per_request']:<3}"
    )
    if "skipped" in cell:
        return f"{name} skipped: {cell['skipped'][:90]}"
    errors = ",".join(f"{k}:{v}" for k, v in cell.get("errors", {}).items()) or "0"
    cpu = cell.get("loadgen_cpu_percent")
    server = cell.get("server_cpu_ms_per_request")
    return (
        f"{name} {_number(cell['requests_per_s'], 8)} req/s {_number(cell['images_per_s'], 8)} "
        f"img/s p50 {_number(cell['p50_ms'], 8)} ms p99 {_number(cell['p99_ms'], 8)} ms "
        f"errors {errors} loadgen cpu {_number(cpu, 5, 0)}% server cpu "
        f"{_number(server, 6, 2)} ms/req"
    )


COLUMNS = (
    ("model", "model", None),
    ("engine", "engine", None),
    ("door", "door", None),
    ("c", "concurrency", 0),
    ("images", "images_per_request", 0),
    ("img/s", "server_images_per_s", 1),
    ("p99 ms", "server_p99_ms", 0),
    ("× engine", "server_over_engine", 2),
    *((f"× {peer.title}", f"server_over_{peer.name}", 2) for peer in PEERS),
    ("× Serve gRPC", "server_over_grpc", 2),
    ("× Serve no-op", "server_over_serve_noop", 2),
)
"""The ratio tables' columns: heading, field, digits (None: a name, aligned left)."""


def columns(row: Cell) -> list[str]:
    """A ratio row's values, in :data:`COLUMNS`' order ("–": not measured)."""
    return [
        row[key] if digits is None else "–" if row[key] is None else f"{row[key]:.{digits}f}"
        for _, key, digits in COLUMNS
    ]


def ratio_table(rows: Sequence[Cell]) -> str:
    """The ratios as a plain-text table."""
    table = [[heading for heading, _, _ in COLUMNS], *map(columns, rows)]
    widths = [max(map(len, values)) for values in zip(*table, strict=True)]
    return "\n".join(
        " ".join(
            value.ljust(width) if digits is None else value.rjust(width)
            for value, width, (_, _, digits) in zip(line, widths, COLUMNS, strict=True)
        )
        for line in table
    )


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every target's cells, then the report."""
    torch.set_num_threads(args.threads)
    loadavg_before, started = os.getloadavg(), time.perf_counter()
    cells = grid(args.concurrency, args.images)
    timing = Timing(args.warmup, args.duration, args.timeout)
    per_target = {"engine": len(args.engines), "espro": len(args.engines) * len(args.doors)}
    per_target |= {peer.name: len(peer.engines(args)) * len(args.doors) for peer in PEERS}
    total = len(cells) * len(args.models) * sum(per_target[t] for t in args.targets)
    if "espro" in args.targets:  # and Serve's no-op ceiling, one-image cells
        total += sum(cell.images == 1 for cell in cells)
    results: list[Cell] = []
    processes: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="espro-serving-bench-") as workdir,
        tqdm(total=total, desc="cells", unit="cell", file=sys.stderr, disable=None) as progress,
        LoadGenerator(args.loadgen_core) as loadgen,
    ):

        def report(cell: Cell) -> None:
            progress.write(cell_row(cell))
            progress.update()

        bundles = {model: reference_bundle(Path(workdir) / model, model) for model in args.models}
        plans = {model: cells for model in args.models}
        if "engine" in args.targets:
            for model, bundle in bundles.items():
                for engine in args.engines:
                    results += engine_cells(
                        bundle, model, engine, cells, timing, report,
                        device=args.device, max_window_s=args.max_window,
                    )  # fmt: skip
                rates = engine_rates(results, model)
                if rates:
                    plans[model] = fitted(cells, rates, timing, args.max_window)
        if "espro" in args.targets:
            espro, processes["espro"] = espro_cells(args, bundles, loadgen, plans, timing, report)
            results += espro
        for peer in PEERS:
            if peer.name not in args.targets:
                continue
            processes[peer.name] = {}
            for model, bundle in bundles.items():
                theirs, processes[peer.name][model] = peer_cells(
                    args, peer, model, bundle, loadgen, plans[model], timing, report
                )
                results += theirs
    return summary(args, results, processes, loadavg_before, time.perf_counter() - started)


def summary(
    args: argparse.Namespace,
    cells: list[Cell],
    processes: dict[str, Any],
    loadavg_before: tuple[float, float, float],
    seconds: float,
) -> dict[str, Any]:
    """The report: what ran where, every cell, the ratios and the targets."""
    rows = ratios(cells)
    return {
        "command": args.command,
        "commit": commit(),
        "machine": machine(torch.device(args.device)) | {"nproc": len(os.sched_getaffinity(0))},
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "seconds": round(seconds, 1),
        "settings": {
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "request_timeout_s": args.timeout,
            "torch_threads": args.threads,
            "max_batch_size": MAX_BATCH_SIZE,
            "batch_wait_ms": args.batch_wait_ms,
            "max_window_s": args.max_window,
            "rounds_per_window": ROUNDS,
            "loadgen_core": args.loadgen_core,
        },
        "bundle": {
            model: {
                "architecture": model,
                "kwargs": ARCHITECTURES[model],
                "input_shape": INPUT_SHAPE,
                "members": SIMPLEXES * DRAWS,
            }
            for model in args.models
        },
        "cells": cells,
        "ratios": rows,
        "targets": targets(rows),
        "processes": processes,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny cells: a smoke test")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--timeout", type=float, default=60.0, help="one request's limit (s)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 16], help="per request")
    parser.add_argument(
        "--max-window",
        type=float,
        default=60.0,
        help=f"longest measured window (s): a cell needs {ROUNDS} rounds at the engine's rate",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--models", nargs="+", choices=ARCHITECTURES, default=["cnn"], help="default: cnn"
    )
    parser.add_argument("--doors", nargs="+", default=list(DOORS), choices=DOORS)
    parser.add_argument("--engines", nargs="+", default=["auto"])
    parser.add_argument("--targets", nargs="+", default=list(TARGET_NAMES), choices=TARGET_NAMES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and replica CPUs)")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=AppConfig.model_fields["batch_wait_timeout_s"].default * 1000,
        help="the server's batch_wait_timeout_s, in ms (default: the server's)",
    )
    parser.add_argument("--loadgen-core", type=int, default=max(os.sched_getaffinity(0)))
    parser.add_argument("--http-port", type=int, default=28000)
    parser.add_argument("--grpc-port", type=int, default=28001)
    parser.add_argument("--direct-grpc-port", type=int, default=28002)
    parser.add_argument("--direct-http-port", type=int, default=28003)
    parser.add_argument("--metrics-port", type=int, default=28080)
    for peer in PEERS:
        venv = HERE.parent / f".venv-{peer.name}"
        parser.add_argument(f"--{peer.name}-python", default=str(venv / "bin" / "python"))
        parser.add_argument(f"--{peer.name}-http-port", type=int, default=peer.http_port)
        parser.add_argument(f"--{peer.name}-grpc-port", type=int, default=peer.grpc_port)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving-cpu.json")
    parser.add_argument(
        "--markdown", type=Path, help="print the tables of a report JSON for the docs, and stop"
    )
    parser.add_argument("--loadgen-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["benchmarks/serving_load.py", *given])
    if args.quick:
        args.duration, args.warmup, args.concurrency, args.images = 1.0, 0.5, [1, 4], [1, 4]
    return args


def markdown(report: dict[str, Any]) -> str:
    """The report's ratios and targets as the Markdown tables of docs/performance.md."""
    lines = [
        "| " + " | ".join(heading for heading, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" if digits is None else "---:" for _, _, digits in COLUMNS) + "|",
        *("| " + " | ".join(columns(row)) + " |" for row in report["ratios"]),
        "",
        "| target | model | engine | door | ratio | met |",
        "|---|---|---|---|---:|---|",
    ]
    for t in report["targets"]:
        met = {True: "yes", False: "no", None: "–"}[t["met"]]
        ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(
            f"| {t['target']} | {t['model']} | {t['engine']} | {t['door']} | {ratio} | {met} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.loadgen_worker:
        loadgen_worker()
        return None
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return None
    report = run(args)
    print(ratio_table(report["ratios"]))
    for target in report["targets"]:
        name = f"{target['model']:8} {target['engine']:11} {target['door']:18}"
        print(f"{name} {target['target']}: {target['met']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
