"""Shared fixtures: tiny but real bundles built from random tensors, without any training.

``make_tiny_bundle(...)`` returns a :class:`TinyBundle` (a manifest and its tensors, not yet
written); ``tiny.write(path)`` turns it into a bundle directory that ``load_bundle`` accepts.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from serving.architectures import create_model
from serving.bundle import write_bundle
from serving.manifest import (
    AbstentionSpec,
    ArchitectureSpec,
    ConformalSpec,
    DrawSpec,
    InputSpec,
    Manifest,
    SimplexSpec,
    Task,
    buffer_key,
    draw_buffer_key,
    vertex_key,
)
from serving.simplex import sample_dirichlet

INPUT_SHAPE = (4,)
CLASS_NAMES = ("cat", "dog", "bird")
BATCHNORM_ARCHITECTURE = f"{__name__}:batchnorm_mlp"
"""A ``module:callable`` architecture: Predictor needs ``allow_custom_architecture=True``."""


def batchnorm_mlp(*, input_shape: Sequence[int], num_outputs: int, hidden: int = 8) -> nn.Module:
    """Linear → BatchNorm1d → ReLU → Linear, the smallest network with BatchNorm statistics."""
    return nn.Sequential(
        nn.Linear(input_shape[0], hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_outputs),
    )


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

    The network is the registered ``mlp`` with ``hidden=(8,)``, or with ``batchnorm=True``
    :func:`batchnorm_mlp`, whose draws each carry their own random BatchNorm statistics.
    ``manifest_fields`` override manifest fields (``temperature``, ``input``, ``conformal``, …).
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


@pytest.fixture
def make_tiny_bundle() -> Callable[..., TinyBundle]:
    """The :func:`tiny_bundle` factory: ``make_tiny_bundle(batchnorm=True, temperature=2.0)``."""
    return tiny_bundle


@pytest.fixture
def tiny_bundle_dir(tmp_path: Path) -> Path:
    """The default tiny bundle (mlp, no BatchNorm), written to ``tmp_path / "bundle"``."""
    return tiny_bundle().write(tmp_path / "bundle")


class SlowLinear(nn.Linear):
    """A linear layer that sleeps on every forward: a model whose cost a test controls."""

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


# --------------------------------------------------------------------------- a real server

LOOPBACK_ONLY = (
    "tests that start Ray or a server must run in a network namespace with only loopback, "
    "as the README's test command does: unshare --net sh -c 'ip link set lo up; exec pytest'"
)


def _loopback_only() -> bool:
    return all(name == "lo" for _, name in socket.if_nameindex())


@dataclass
class Server:
    """A running espro app on loopback, its bundles, and the config it was started with."""

    http: str
    grpc: str
    direct: str
    """The replica's own gRPC door, past Serve's proxy."""
    metrics: str
    bundles: dict[str, Path]
    config: Any  # serving.settings.AppConfig (imported lazily: Ray only where needed)

    def redeploy(self, **changes: Any) -> None:
        """Update the running app in place with ``changes`` to its config."""
        from serving.launch import deploy

        deploy(self.config.model_copy(update=changes))


PROBE_ADDRESS = "192.0.2.1"
"""A documentation-range address added to the namespace, so that a wildcard bind is a socket
it would reach; no test sends it traffic."""


def _add_probe_address() -> None:
    """A second interface holding :data:`PROBE_ADDRESS` (a dummy one, or one end of a veth
    pair where the kernel has no dummy driver)."""
    commands = [
        ["ip", "link", "add", "espro-probe", "type", "dummy"],
        ["ip", "link", "add", "espro-probe", "type", "veth", "peer", "name", "espro-peer"],
    ]
    if not any(subprocess.run(c, capture_output=True).returncode == 0 for c in commands):
        pytest.fail("cannot add a second interface to the test namespace (ip link add)")
    for command in (
        ["ip", "addr", "add", f"{PROBE_ADDRESS}/24", "dev", "espro-probe"],
        ["ip", "link", "set", "espro-probe", "up"],
    ):
        subprocess.run(command, check=True, capture_output=True)


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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole test session (a cold start costs seconds), on loopback,
    exporting metrics at 127.0.0.1:18080.

    The namespace also gets :data:`PROBE_ADDRESS` on a second interface before Ray starts,
    which a loopback-only namespace would hide: what binds the wildcard listens there too."""
    if not _loopback_only():
        pytest.fail(LOOPBACK_ONLY)
    _add_probe_address()
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    # Replicas and tasks import this module to build the custom test architectures.
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    import ray

    from serving.cluster import connect

    connect(num_cpus=2, num_gpus=0, _metrics_export_port=18080, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def server(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The espro app on the session's Ray, for the whole session.

    It serves ``tiny`` versions 1 and 2, ``tiny-bn`` (BatchNorm) and ``slow`` (50 ms per
    member), with 2 fresh draws allowed and a 1 MiB body limit; Serve's doors answer a request
    still waiting after 20 s with 408 / ``DEADLINE_EXCEEDED``. The replica also serves gRPC on
    its direct door.
    """
    from serving import launch
    from serving.settings import AppConfig, LaunchConfig

    root = tmp_path_factory.mktemp("served")
    bundles = {
        "tiny/1": tiny_bundle(seed=0, version="1").write(root / "tiny-1"),
        "tiny/2": tiny_bundle(seed=1, version="2").write(root / "tiny-2"),
        "tiny-bn": tiny_bundle(batchnorm=True).write(root / "tiny-bn"),
        "slow": tiny_bundle(slow=True, num_vertices=(2,), draws=1).write(root / "slow"),
    }
    config = AppConfig(
        bundles=[str(path) for path in bundles.values()],
        max_fresh_draws=2,
        allow_custom_architecture=True,
        max_body_bytes=1 << 20,
        torch_threads=1,
        direct_grpc_port=19050,
    )
    ports = LaunchConfig(http_port=18000, grpc_port=19000, request_timeout_s=20)
    launch.start(config, ports)
    try:
        yield Server(
            http="http://127.0.0.1:18000",
            grpc="127.0.0.1:19000",
            direct="127.0.0.1:19050",
            metrics="http://127.0.0.1:18080/metrics",
            bundles=bundles,
            config=config,
        )
    finally:
        launch.stop()
