"""Fixtures: tiny bundles, and one local Ray with the espro app on loopback for the session.

Plain helpers (bundle factories, test architectures, the server's handle) are in helpers.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import PETS_IMAGES, Server, TinyBundle, tiny_bundle


@pytest.fixture
def make_tiny_bundle() -> Callable[..., TinyBundle]:
    """The :func:`tiny_bundle` factory: ``make_tiny_bundle(batchnorm=True, temperature=2.0)``."""
    return tiny_bundle


@pytest.fixture
def tiny_bundle_dir(tmp_path: Path) -> Path:
    """The default tiny bundle (mlp, no BatchNorm), written to ``tmp_path / "bundle"``."""
    return tiny_bundle().write(tmp_path / "bundle")


# --------------------------------------------------------------------------- a real server

LOOPBACK_ONLY = (
    "tests that start Ray or a server must run in a network namespace with only loopback, "
    "as the README's test command does: unshare --net sh -c 'ip link set lo up; exec pytest'"
)


def _loopback_only() -> bool:
    return all(name == "lo" for _, name in socket.if_nameindex())


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
    # Replicas and tasks import helpers.py to build the custom test architectures.
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

    It serves ``tiny`` versions 1 and 2, ``tiny-bn`` (BatchNorm), ``slow`` (50 ms per member)
    and ``pets`` (trained on 2x2 grayscale images) with the ``fused:graphs`` engine, 2 fresh
    draws allowed and a 1 MiB body limit; Serve's doors answer a request still waiting after
    20 s with 408 / ``DEADLINE_EXCEEDED``. The replica also serves gRPC and HTTP on its direct
    doors.
    """
    from serving import launch
    from serving.manifest import InputSpec
    from serving.settings import AppConfig, LaunchConfig

    root = tmp_path_factory.mktemp("served")
    bundles = {
        "tiny/1": tiny_bundle(seed=0, version="1").write(root / "tiny-1"),
        "tiny/2": tiny_bundle(seed=1, version="2").write(root / "tiny-2"),
        "tiny-bn": tiny_bundle(batchnorm=True).write(root / "tiny-bn"),
        "slow": tiny_bundle(slow=True, num_vertices=(2,), draws=1).write(root / "slow"),
        "pets": tiny_bundle(
            name="pets",
            input=InputSpec(shape=(1, 2, 2), mean=(0.5,), std=(0.25,), image=PETS_IMAGES),
        ).write(root / "pets"),
    }
    config = AppConfig(
        bundles=[str(path) for path in bundles.values()],
        # Not the default auto: the test models sleep and hold in Python, which an ONNX export
        # (one of auto's candidates) would trace away, and auto would pick engines by speed.
        engine="fused:graphs",
        max_fresh_draws=2,
        allow_custom_architecture=True,
        max_body_bytes=1 << 20,
        torch_threads=1,
        direct_grpc_port=19050,
        direct_http_port=19051,
    )
    ports = LaunchConfig(http_port=18000, grpc_port=19000, request_timeout_s=20)
    launch.start(config, ports)
    try:
        yield Server(
            http="http://127.0.0.1:18000",
            grpc="127.0.0.1:19000",
            direct="127.0.0.1:19050",
            direct_http="http://127.0.0.1:19051",
            metrics="http://127.0.0.1:18080/metrics",
            bundles=bundles,
            config=config,
        )
    finally:
        launch.stop()
