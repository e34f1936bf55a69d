"""The direct doors: each replica serves OIP gRPC and HTTP itself, past Serve's proxies.

Through Serve, a one-image request costs more CPU in the proxy hop and the replica's request
handling than its share of the engine (docs/performance.md). The direct gRPC door is a
``grpc.aio`` server on the replica's event loop that hands each call to the same methods
Serve's gRPC proxy calls; the direct HTTP door is a uvicorn server on that loop running the
replica's own FastAPI app, the one Serve's HTTP proxy forwards to, whose model endpoints it
calls past the app's router (:class:`Routes`). Their answers, refusals, auth, batching and
metrics are Serve's doors'; only the hops are gone.

What they give up: Serve neither routes nor counts these requests (its autoscaling, queue
bounds and ``request_timeout_s`` do not see them; each door refuses requests past its own bound,
as Serve's proxy does past a full queue: ``RESOURCE_EXHAUSTED`` with 503 in the
:data:`~serving.errors.STATUS_TRAILER` trailer, or HTTP 503 with ``Retry-After``), and clients
balance across replicas by connection. Replicas on one node share each port
(``SO_REUSEPORT``), so the kernel spreads new connections over them and a replica that starts
while an old one drains binds it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import grpc
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path

from serving.doors import http_error
from serving.errors import STATUS_TRAILER, ServiceError
from serving.proto.grpc_predict_v2_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)

logger = logging.getLogger("ray.serve")

RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
"""The OIP v2 RPCs; the replica answers each with its method of the same name."""

Method = Callable[[Any, Any], Awaitable[Any]]


def _delegate(name: str) -> Callable[[DirectServicer, Any, Any], Awaitable[Any]]:
    async def call(self: DirectServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.in_flight >= self.max_in_flight:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request dropped due to backpressure: the replica holds {self.in_flight} "
                "direct calls, its bound; retry",
                trailing_metadata=((STATUS_TRAILER, "503"),),
            )
        self.in_flight += 1
        try:
            return await self.methods[name](request, context)
        finally:
            self.in_flight -= 1

    call.__name__ = name
    return call


class DirectServicer(GRPCInferenceServiceServicer):
    """The OIP gRPC service answered by ``methods[rpc](request, context)`` for each RPC,
    at most ``max_in_flight`` calls at once."""

    def __init__(self, methods: dict[str, Method], max_in_flight: int) -> None:
        missing = set(RPCS) - set(methods)
        if missing:
            raise ValueError(f"no method for the RPCs {sorted(missing)}")
        self.methods = methods
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    ServerLive = _delegate("ServerLive")
    ServerReady = _delegate("ServerReady")
    ModelReady = _delegate("ModelReady")
    ServerMetadata = _delegate("ServerMetadata")
    ModelMetadata = _delegate("ModelMetadata")
    ModelInfer = _delegate("ModelInfer")


async def start_direct_door(
    methods: dict[str, Method],
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    max_in_flight: int,
) -> grpc.aio.Server:
    """Start a gRPC server on ``host:port`` answering the OIP service with ``methods``, at most
    ``max_in_flight`` calls at once, on the running event loop; a port that cannot be bound is
    a clear ``OSError``."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ],
    )
    add_GRPCInferenceServiceServicer_to_server(DirectServicer(methods, max_in_flight), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc raises RuntimeError for an address it cannot bind
        raise OSError(f"the direct gRPC door cannot listen on {address}: {err}") from None
    if bound == 0:
        raise OSError(f"the direct gRPC door cannot listen on {address}")
    await server.start()
    logger.info("direct gRPC door listening on %s", address)
    return server


# --------------------------------------------------------------------------- HTTP

DIRECT_SCOPE = "espro.direct"
"""The ASGI scope key the direct HTTP door sets, so the app counts its requests apart."""
RETRY_AFTER_S = 1

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
Endpoint = Callable[..., Awaitable[Response]]
"""An app's endpoint: called with ``request=`` and the path's parameters by name."""


class Routes:
    """An ASGI app that answers a POST to one of ``endpoints``' path templates (such as
    ``/v2/models/{name}/infer``) by calling that endpoint, and hands every other request to
    ``app``.

    The endpoints are ``app``'s own, so their answers are the app's; what is skipped is its
    router and middleware, a large share of a small request's CPU on the replica
    (docs/performance.md, "The direct HTTP door's model routes").
    """

    def __init__(self, app: ASGIApp, endpoints: dict[str, Endpoint]) -> None:
        self.app = app
        self.routes = [(compile_path(path), endpoint) for path, endpoint in endpoints.items()]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for (pattern, _, convertors), endpoint in self.routes:
                if match := pattern.match(scope["path"]):
                    params = {k: convertors[k].convert(v) for k, v in match.groupdict().items()}
                    response = await endpoint(request=Request(scope, receive), **params)
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)


class Bounded:
    """An ASGI app that runs ``app`` for at most ``max_in_flight`` HTTP requests at once and
    answers those past it with 503 and ``Retry-After``, unread; its requests carry
    :data:`DIRECT_SCOPE`."""

    def __init__(self, app: ASGIApp, max_in_flight: int) -> None:
        self.app, self.max_in_flight = app, max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            message = (
                f"request dropped due to backpressure: the replica holds {self.in_flight} "
                "direct requests, its bound; retry"
            )
            response = http_error(ServiceError(503, message))
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app({**scope, DIRECT_SCOPE: True}, receive, send)
        finally:
            self.in_flight -= 1


class _ReplicaServer(uvicorn.Server):
    """uvicorn on a loop it does not own: the replica's signals stay the replica's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DirectHttpDoor:
    """A running direct HTTP door; :meth:`stop` drains it."""

    def __init__(self, server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
        self.server, self.serving = server, serving

    async def stop(self) -> None:
        """Take no new connections; let requests in flight finish (for at most the
        ``drain_s`` the door started with), then close."""
        self.server.should_exit = True
        await self.serving


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(f"the direct HTTP door cannot listen on {address}: {err}") from None
    return sock


async def start_direct_http_door(
    app: ASGIApp, *, host: str, port: int, max_in_flight: int, drain_s: float
) -> DirectHttpDoor:
    """Serve ``app`` over HTTP/1.1 on ``host:port``, at most ``max_in_flight`` requests at once,
    on the running event loop; a port that cannot be bound is a clear ``OSError``."""
    sock = _listening_socket(host, port)
    config = uvicorn.Config(
        Bounded(app, max_in_flight),
        lifespan="off",  # Serve ran the app's startup
        log_config=None,  # the replica's logging stays as Serve set it up
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=drain_s,
    )
    server = _ReplicaServer(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():  # it failed before listening
            sock.close()
            serving.result()
            raise OSError(f"the direct HTTP door on {host}:{port} stopped as it started")
        await asyncio.sleep(0.01)
    logger.info("direct HTTP door listening on %s:%d", host, port)
    return DirectHttpDoor(server, serving)
