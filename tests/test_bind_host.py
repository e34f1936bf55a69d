"""Wildcard gRPC binds in Ray workers move to the address espro listens on."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc.aio import _server

from helpers import listeners
from serving.bind_host import install, rebind


@pytest.mark.parametrize(
    ("address", "host", "expected"),
    [
        ("[::]:0", "127.0.0.1", "127.0.0.1:0"),
        ("[::]:9000", "127.0.0.1", "127.0.0.1:9000"),
        ("0.0.0.0:9000", "10.1.2.3", "10.1.2.3:9000"),
        (":9000", "127.0.0.1", "127.0.0.1:9000"),
        ("[::]:9000", "::1", "[::1]:9000"),
        ("[::]:9000", "0.0.0.0", "0.0.0.0:9000"),
        ("127.0.0.1:9100", "10.1.2.3", "127.0.0.1:9100"),  # an explicit address stays
        ("[::1]:9100", "10.1.2.3", "[::1]:9100"),
        ("unix:/tmp/socket", "127.0.0.1", "unix:/tmp/socket"),
    ],
)
def test_rebind_replaces_only_the_wildcard(address, host, expected):
    assert rebind(address, host) == expected


@pytest.fixture
def restore_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo :func:`install` after the test."""
    for name in ("add_insecure_port", "add_secure_port"):
        monkeypatch.setattr(_server.Server, name, getattr(_server.Server, name))


def test_a_grpc_server_asking_for_the_wildcard_listens_on_the_host(restore_grpc):
    install("127.0.0.1")
    install("127.0.0.1")  # a second install does not wrap twice
    assert _server.Server.add_insecure_port.__wrapped__.__name__ == "add_insecure_port"

    async def bound_addresses() -> set[str]:
        server = grpc.aio.server()
        port = server.add_insecure_port("[::]:0")
        await server.start()
        try:
            return {str(x.address) for x in listeners() if x.port == port}
        finally:
            await server.stop(None)

    assert asyncio.run(bound_addresses()) == {"127.0.0.1"}


def test_without_a_host_nothing_is_installed(restore_grpc, monkeypatch):
    monkeypatch.delenv("ESPRO_BIND_HOST", raising=False)
    before = _server.Server.add_insecure_port
    install()
    assert _server.Server.add_insecure_port is before
