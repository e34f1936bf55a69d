"""The direct gRPC door: each replica serves the OIP gRPC service itself, past Serve's proxy.

Through Serve, a one-image request costs more CPU in the proxy hop and the replica's request
handling than its share of the engine (docs/performance.md). The direct door is a ``grpc.aio``
server on the replica's event loop that hands each call to the same methods Serve's gRPC proxy
calls, so its answers, refusals, batching and metrics are the same; only the hops are gone.

What it gives up: Serve neither routes nor counts these requests (its autoscaling and queue
bounds do not see them; the door refuses calls past its own bound with ``RESOURCE_EXHAUSTED``,
as Serve's proxy does past a full queue, and 503 in the :data:`~serving.errors.STATUS_TRAILER`
trailer), and clients balance across replicas by connection. Replicas on one node share the
port (``SO_REUSEPORT``), so the kernel spreads new connections over them and a replica that
starts while an old one drains binds it too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from serving.errors import STATUS_TRAILER
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
