"""Helpers the tests share: tiny bundles built from random tensors, test architectures, a
tiny training config, the session server's handle and this namespace's listening sockets.

Fixtures live in conftest.py; this module is plain code. Replicas import it too (the
``ray_cluster`` fixture puts this folder on their ``PYTHONPATH``) to build the
``helpers:...`` architectures, so it imports neither pytest nor Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from serving.architectures import create_model
from serving.bundle import write_bundle
from serving.manifest import (
    AbstentionSpec,
    ArchitectureSpec,
    ConformalSpec,
    DrawSpec,
    ImageSpec,
    InputSpec,
    Manifest,
    SimplexSpec,
    Task,
    buffer_key,
    draw_buffer_key,
    vertex_key,
)
from serving.simplex import sample_dirichlet

if TYPE_CHECKING:
    from training.config import TrainConfig

INPUT_SHAPE = (4,)
CLASS_NAMES = ("cat", "dog", "bird")
PETS_IMAGES = ImageSpec(size=(2, 2), color="grayscale")
"""The image spec of the served ``pets`` model: images decode to ``[1, 2, 2]`` instances."""

FP32_ATOL = 1e-5
"""How far float32 outputs may differ when computed through other batch shapes, kernels or
engines: the tolerance the product documents (docs/performance.md, every engine against the
reference; docs/client.md, every protocol against the in-process Predictor). The last bits
of a float change with the batch shape on some CPUs (AVX-512 and AMX kernels)."""


# --------------------------------------------------------------------------- architectures


def batchnorm_mlp(*, input_shape: Sequence[int], num_outputs: int, hidden: int = 8) -> nn.Module:
    """Linear → BatchNorm1d → ReLU → Linear, the smallest network with BatchNorm statistics."""
    return nn.Sequential(
        nn.Linear(input_shape[0], hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_outputs),
    )


BATCHNORM_ARCHITECTURE = f"{__name__}:batchnorm_mlp"
"""A ``module:callable`` architecture: Predictor needs ``allow_custom_architecture=True``."""


class SlowLinear(nn.Linear):
    """A linear layer that sleeps on every forward: a model that costs time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return super().forward(x)


def slow_linear(*, input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """A ``module:callable`` architecture that takes 50 ms per member and batch."""
    return SlowLinear(input_shape[0], num_outputs)


class BrokenLinear(nn.Linear):
    """A linear layer whose forward fails: a bundle that loads but cannot run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this layer cannot run")


def broken_linear(*, input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """A ``module:callable`` architecture with the shapes of :func:`slow_linear` that fails."""
    return BrokenLinear(input_shape[0], num_outputs)


class GatedLinear(nn.Linear):
    """A linear layer that a test holds: each forward appends its batch size to the file
    ``log``, then waits while the file ``hold`` exists."""

    def __init__(self, in_features: int, out_features: int, *, hold: str, log: str) -> None:
        super().__init__(in_features, out_features)
        self.hold, self.log = Path(hold), Path(log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.log.open("a") as log:
            log.write(f"{x.shape[0]}\n")
        while self.hold.exists():
            time.sleep(0.005)
        return super().forward(x)


def gated_linear(*, input_shape: Sequence[int], num_outputs: int, hold: str, log: str) -> nn.Module:
    """A ``module:callable`` architecture with the shapes of :func:`slow_linear` that a
    :class:`Gate` holds."""
    return GatedLinear(input_shape[0], num_outputs, hold=hold, log=log)


@dataclass(frozen=True)
class Gate:
    """The files of a :func:`gated_linear` model: closed, every forward of the model waits
    (where it runs, a replica included) until the gate opens; each forward is logged."""

    folder: Path

    @property
    def hold(self) -> Path:
        return self.folder / "hold"

    @property
    def log(self) -> Path:
        return self.folder / "batches"

    def architecture(self) -> ArchitectureSpec:
        return ArchitectureSpec(
            name=f"{__name__}:gated_linear", kwargs={"hold": str(self.hold), "log": str(self.log)}
        )

    def bundle(self, path: Path, name: str = "gated") -> Path:
        """A one-member bundle of the gated model, written to ``path``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tiny = tiny_bundle(
            slow=True, name=name, num_vertices=(2,), draws=1, architecture=self.architecture()
        )
        return tiny.write(path)

    def close(self) -> None:
        self.hold.touch()

    def open(self) -> None:
        self.hold.unlink(missing_ok=True)

    def batches(self) -> list[int]:
        """The batch size of every forward so far, in order."""
        return [int(line) for line in self.log.read_text().split()] if self.log.exists() else []


class GrpcContext:
    """A gRPC servicer context that records the code, details and trailer it is answered
    with; its call carries ``Bearer {token}`` unless ``token`` is None."""

    TOKEN = "tok-" + "3" * 24

    def __init__(self, token: str | None = TOKEN) -> None:
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.code = self.details = self.trailer = None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailer = metadata


# --------------------------------------------------------------------------- tiny bundles


@dataclass(frozen=True)
class TinyBundle:
    """A manifest and the tensors it names, ready to write."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    @property
    def custom(self) -> bool:
        """Whether the architecture is a ``module:callable`` (Predictor must allow it)."""
        return ":" in self.manifest.architecture.name

    def build_model(self) -> nn.Module:
        """A fresh instance of the bundle's architecture (weights not loaded)."""
        spec = self.manifest.architecture
        return create_model(
            spec.name,
            input_shape=self.manifest.input.shape,
            num_outputs=self.manifest.num_outputs,
            allow_custom=self.custom,
            **spec.kwargs,
        )

    def write(self, path: Path, *, overwrite: bool = False) -> Path:
        return write_bundle(path, self.manifest, self.tensors, overwrite=overwrite)


def tiny_bundle(
    *,
    batchnorm: bool = False,
    slow: bool = False,
    num_vertices: Sequence[int] = (2, 3),
    draws: int = 2,
    seed: int = 0,
    **manifest_fields: Any,
) -> TinyBundle:
    """A 3-class bundle for inputs of shape (4,) with random vertices, one simplex per entry
    of ``num_vertices`` and ``draws`` Dirichlet draws per simplex.

    The network is the registered ``mlp`` with ``hidden=(8,)``, with ``batchnorm=True``
    :func:`batchnorm_mlp`, whose draws each carry their own random BatchNorm statistics, or
    with ``slow=True`` :func:`slow_linear` (or any architecture of its shapes given as
    ``architecture``). ``manifest_fields`` override manifest fields (``temperature``,
    ``input``, ``conformal``, …).
    """
    gen = torch.Generator().manual_seed(seed)
    if batchnorm:
        architecture = ArchitectureSpec(name=BATCHNORM_ARCHITECTURE, kwargs={"hidden": 8})
    elif slow:
        architecture = ArchitectureSpec(name=f"{__name__}:slow_linear")
    else:
        architecture = ArchitectureSpec(name="mlp", kwargs={"hidden": [8]})
    model = create_model(
        architecture.name,
        input_shape=INPUT_SHAPE,
        num_outputs=len(CLASS_NAMES),
        allow_custom=batchnorm or slow,
        **architecture.kwargs,
    )
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    bn_names = tuple(buffers)  # every buffer of these two networks is a BatchNorm statistic

    def random_buffer(name: str) -> torch.Tensor:
        like = buffers[name]
        if not like.is_floating_point():
            return torch.randint(1, 100, like.shape, generator=gen)
        if name.endswith("running_var"):
            return torch.rand(like.shape, generator=gen) + 0.5
        return torch.randn(like.shape, generator=gen)

    tensors: dict[str, torch.Tensor] = {}
    simplexes = []
    for m, n_vertices in enumerate(num_vertices):
        for j in range(n_vertices):
            for name, p in params.items():
                tensors[vertex_key(m, j, name)] = torch.randn(p.shape, generator=gen)
        tensors |= {buffer_key(m, name): random_buffer(name) for name in buffers}
        alphas = sample_dirichlet(n_vertices, draws, torch.Generator().manual_seed(seed + m))
        for s in range(draws):
            tensors |= {draw_buffer_key(m, s, name): random_buffer(name) for name in bn_names}
        simplexes.append(
            SimplexSpec(
                num_vertices=n_vertices,
                draw_seed=seed + m,
                draws=tuple(DrawSpec(alpha=a.tolist(), batchnorm=batchnorm) for a in alphas),
            )
        )

    fields: dict[str, Any] = {
        "name": "tiny-bn" if batchnorm else "slow" if slow else "tiny",
        "version": "1",
        "task": Task.CLASSIFICATION,
        "architecture": architecture,
        "input": InputSpec(shape=INPUT_SHAPE, mean=(0.5, -1.0, 0.0, 2.0), std=(1.0, 2.0, 0.5, 4.0)),
        "num_outputs": len(CLASS_NAMES),
        "class_names": CLASS_NAMES,
        "parameter_names": tuple(params),
        "buffer_names": tuple(buffers),
        "batchnorm_buffer_names": bn_names,
        "simplexes": tuple(simplexes),
        "temperature": 1.5,
        "conformal": ConformalSpec(method="lac", coverage=0.9, threshold=0.7, num_calibration=50),
        "abstention": AbstentionSpec(target_error=0.1, threshold=0.5, calibration_coverage=0.8),
    }
    return TinyBundle(Manifest(**(fields | manifest_fields)), tensors)


# --------------------------------------------------------------------------- training

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"name": "two_spirals", "options": {"n_samples": 300}},
    "model": {"architecture": "mlp", "kwargs": {"hidden": [16]}},
    "modes": {"count": 2, "epochs": 3, "lr": 0.05, "batch_size": 64},
    "simplex": {"vertices": 1, "epochs": 2, "lr": 0.02, "samples": 2, "lambda": 0.1},
    "draws": {"per_simplex": 3},
    "evaluation": {"noise_severities": [0.5]},
}
"""A training config that trains in seconds."""


def tiny_config(**sections: Any) -> TrainConfig:
    """:data:`TINY` with ``sections`` merged in (a dict merges into its section)."""
    from training.config import parse_config

    data = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


# --------------------------------------------------------------------------- image folders

SHAPES = ("circle", "square", "triangle")


def shape_pngs(
    root: Path, per_class: int, *, size: int = 12, splits: Sequence[str] = ("train",), seed: int = 0
) -> dict[str, list[Path]]:
    """A torchvision-style image folder, ``root/<split>/<shape>/<i>.png``: RGB ``size`` x
    ``size`` PNGs of one filled shape each (:data:`SHAPES`), of a random position, radius and
    colour (its class's channel the brightest) on a noisy dark background. Returns every
    split's files, in order."""
    from torchvision.io import write_png  # seconds to import: not where replicas import this

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    files: dict[str, list[Path]] = {}
    for split in splits:
        for c, shape in enumerate(SHAPES):
            (root / split / shape).mkdir(parents=True)
            for i in range(per_class):
                r = int(torch.randint(size // 5, size // 3, (1,), generator=g)) + 1
                cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=g))
                dy, dx = (yy - cy).abs(), (xx - cx).abs()
                mask = {
                    "circle": dy**2 + dx**2 <= r * r,
                    "square": (dy <= r) & (dx <= r),
                    "triangle": (dy <= r) & (2 * dx <= yy - cy + r),
                }[shape]
                image = torch.randint(0, 60, (3, size, size), generator=g, dtype=torch.uint8)
                colour = torch.randint(60, 140, (3, 1, 1), generator=g, dtype=torch.uint8)
                colour[c] += 100  # each class its own hue too: learnt in a few epochs
                image = torch.where(mask, colour, image)
                path = root / split / shape / f"{i}.png"
                write_png(image, str(path))
                files.setdefault(split, []).append(path)
    return files


# --------------------------------------------------------------------------- a real server


@dataclass
class Server:
    """A running espro app on loopback, its bundles, and the config it was started with."""

    http: str
    grpc: str
    direct: str
    """The replica's own gRPC door, past Serve's proxy."""
    direct_http: str
    """The replica's own HTTP door, past Serve's proxy."""
    metrics: str
    bundles: dict[str, Path]
    config: Any  # serving.settings.AppConfig (imported lazily: Ray only where needed)

    def redeploy(self, **changes: Any) -> None:
        """Update the running app in place with ``changes``: to Serve's deployment options
        where a change names one of them (``num_replicas``, ``max_ongoing_requests``, …), else
        to the app's config. Both are validated: an unknown name is an error."""
        from serving.launch import deploy
        from serving.settings import AppConfig, DeploymentOptions

        options = {k: v for k, v in changes.items() if k in DeploymentOptions.model_fields}
        app = {k: v for k, v in changes.items() if k not in options}
        config = AppConfig.model_validate(self.config.model_dump() | app)
        deploy(config, DeploymentOptions.model_validate(options))


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    """Poll ``condition`` until it is truthy and return its value; fail naming ``what`` if it
    is not within ``timeout_s`` (a bound on a hang, not on speed)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return value


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket of this network namespace and the process that holds it."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    """IPv4-mapped IPv6 addresses are given as IPv4."""
    port: int
    command: str
    """The holder's command line ("?" when it has exited)."""


def _socket_owners() -> dict[str, str]:
    """Socket inode → command line of the process holding it, for every process."""
    owners = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners[target[8:-1]] = command
        except OSError:  # the process exited while being read
            continue
    return owners


def listeners() -> list[Listener]:
    """Every listening TCP socket in this namespace (``/proc/net/tcp`` and ``tcp6``)."""
    owners, found = _socket_owners(), []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, width * 2, 8))
            ip = ipaddress.ip_address(raw)
            ip = getattr(ip, "ipv4_mapped", None) or ip  # gRPC binds IPv4 as ::ffff:a.b.c.d
            found.append(Listener(ip, int(port, 16), owners.get(fields[9], "?")))
    return found


def reachable_beyond_loopback() -> list[Listener]:
    """The listeners another machine could reach: bound to the wildcard or to any address
    but loopback."""
    return [listener for listener in listeners() if not listener.address.is_loopback]


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/{name}.py``, imported with its folder on ``sys.path`` as when run (the
    benchmarks import their shared modules by name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def free_port() -> int:
    """A loopback port no socket holds now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback port another program listens on, bound without ``SO_REUSEPORT`` so that
    nothing can share it, until the block ends."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_async(test: Callable[[], Awaitable[None]], timeout_s: float = 30) -> None:
    """Run the coroutine ``test()`` to its end, failing it after ``timeout_s`` (a bound on a
    hang, not on speed)."""
    asyncio.run(asyncio.wait_for(test(), timeout=timeout_s))


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds (the caller's timeout bounds a hang)."""
    while not condition():
        await asyncio.sleep(0.005)
