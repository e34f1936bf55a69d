"""Bind the wildcard gRPC servers of Ray Serve to the address espro listens on.

Ray Serve hard-codes the wildcard address for two gRPC servers: its gRPC door (the proxy's
``grpc_options.port``) and each replica's internal inter-deployment server (an ephemeral
port that unpickles request metadata). Neither takes a host setting, so a Ray that espro
starts imports this module in every worker (Ray's ``preload_python_modules``), and it rewrites
a wildcard bind of any ``grpc.aio`` server there to :data:`BIND_HOST_ENV`, the address the
user chose with ``--host``. An explicit address, such as the direct door's, is kept.

The rewrite applies only where :data:`BIND_HOST_ENV` is set, so importing this module
elsewhere changes nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

BIND_HOST_ENV = "ESPRO_BIND_HOST"
"""Where the wildcard gRPC servers of a Ray started by espro listen instead."""

WILDCARDS = ("[::]", "0.0.0.0", "", "[0:0:0:0:0:0:0:0]")


def rebind(address: str, host: str) -> str:
    """``address`` (``host:port``) with a wildcard host replaced by ``host``."""
    bound, sep, port = address.rpartition(":")
    if not sep or bound not in WILDCARDS:
        return address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _rebinding(add_port: Callable[..., int], host: str) -> Callable[..., int]:
    @functools.wraps(add_port)
    def add(server: Any, address: str, *args: Any, **kwargs: Any) -> int:
        return add_port(server, rebind(address, host), *args, **kwargs)

    add.espro_rebinds = True  # type: ignore[attr-defined]
    return add


def install(host: str | None = None) -> None:
    """Make every ``grpc.aio`` server of this process bind ``host`` where it asks for the
    wildcard address (``host`` defaults to :data:`BIND_HOST_ENV`; nothing when unset)."""
    host = host or os.environ.get(BIND_HOST_ENV)
    if not host:
        return
    from grpc.aio import _server

    for name in ("add_insecure_port", "add_secure_port"):
        add_port = getattr(_server.Server, name)
        if not getattr(add_port, "espro_rebinds", False):
            setattr(_server.Server, name, _rebinding(add_port, host))


install()
