"""The direct gRPC door on its own: a grpc.aio server on loopback answering with given methods."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from helpers import free_port, held_port, run_async, until
from serving.app.direct import RPCS, DirectServicer, start_direct_door
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

PORT = free_port()
ADDRESS = f"127.0.0.1:{PORT}"


class Replica:
    """Methods like the replica's: ``ModelInfer`` names the door that answered and refuses an
    unknown model with NOT_FOUND; the first ``held`` calls wait until :attr:`release` is set.
    :attr:`entered` counts the calls that reached ``ModelInfer``."""

    def __init__(self, name: str, held: int = 0) -> None:
        self.name, self.held = name, held
        self.entered = 0
        self.release = asyncio.Event()

    def methods(self) -> dict[str, Callable[[Any, Any], Awaitable[Any]]]:
        async def live(request: Any, context: Any) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        async def infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
            self.entered += 1
            if self.entered <= self.held:
                await self.release.wait()
            if request.model_name != "m":
                context.set_code(grpc.StatusCode.NOT_FOUND)
                context.set_details(f"unknown model {request.model_name!r}")
                return pb.ModelInferResponse()
            return pb.ModelInferResponse(model_name="m", id=self.name)

        return {name: live for name in RPCS} | {"ModelInfer": infer}


async def start(replica: Replica, port: int, **limits: int) -> grpc.aio.Server:
    options = {"max_message_bytes": 1 << 20, "max_in_flight": 16} | limits
    return await start_direct_door(replica.methods(), host="127.0.0.1", port=port, **options)


@contextlib.asynccontextmanager
async def doors(*replicas: Replica, **limits: int) -> AsyncIterator[list[grpc.aio.Server]]:
    """A door for each of ``replicas``, all on one free port (``PORT``), stopped at the end."""
    servers = [await start(replica, PORT, **limits) for replica in replicas]
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop(None)


def infer(channel: grpc.aio.Channel, model: str = "m", **options: Any) -> Awaitable[Any]:
    request = pb.ModelInferRequest(model_name=model)
    return GRPCInferenceServiceStub(channel).ModelInfer(request, **options)


async def infer_on_a_new_connection(model: str = "m") -> pb.ModelInferResponse:
    async with grpc.aio.insecure_channel(ADDRESS) as channel:
        return await infer(channel, model)


def test_the_door_answers_with_the_methods_and_their_status_codes():
    async def test() -> None:
        async with doors(Replica("a")), grpc.aio.insecure_channel(ADDRESS) as channel:
            stub = GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            assert (await infer(channel)).id == "a"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await infer(channel, "x")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "unknown model 'x'" in info.value.details()
            large = pb.ModelInferRequest(model_name="m", raw_input_contents=[bytes(2 << 20)])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(large)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run_async(test)


def test_calls_past_the_concurrency_bound_are_refused_not_queued():
    async def test() -> None:
        replica = Replica("a", held=2)
        async with doors(replica, max_in_flight=2), grpc.aio.insecure_channel(ADDRESS) as channel:
            calls = [asyncio.ensure_future(infer(channel)) for _ in range(4)]
            await until(lambda: replica.entered == 2 and sum(c.done() for c in calls) == 2)
            replica.release.set()
            answers = await asyncio.gather(*calls, return_exceptions=True)
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert sum(isinstance(a, pb.ModelInferResponse) for a in answers) == 2
        assert [a.code() for a in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert all("backpressure" in a.details() for a in refused)  # clients retry these

    run_async(test)


def test_replicas_share_the_port_and_a_stopped_one_leaves_it_to_the_other():
    async def test() -> None:
        async with doors(Replica("a"), Replica("b")) as (first, _):
            # New connections are spread over both.
            assert {(await infer_on_a_new_connection()).id for _ in range(40)} == {"a", "b"}
            await first.stop(1.0)
            assert {(await infer_on_a_new_connection()).id for _ in range(10)} == {"b"}

    run_async(test)


def test_a_stopping_door_finishes_the_calls_in_flight():
    async def test() -> None:
        replica = Replica("a", held=1)
        async with doors(replica) as (server,), grpc.aio.insecure_channel(ADDRESS) as channel:
            call = asyncio.ensure_future(infer(channel))
            await until(lambda: replica.entered == 1)
            stopping = asyncio.ensure_future(server.stop(5.0))
            await asyncio.sleep(0)  # the stop begins
            with pytest.raises(grpc.aio.AioRpcError):  # no new connection is taken
                await infer_on_a_new_connection()
            assert not call.done()
            replica.release.set()
            await stopping
            assert (await call).id == "a"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await infer(channel, timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    run_async(test)


def test_a_port_held_by_another_program_is_a_clear_error():
    async def test() -> None:
        with (
            held_port() as port,
            pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"),
        ):
            await start(Replica("a"), port)

    run_async(test)


def test_every_rpc_needs_a_method():
    with pytest.raises(ValueError, match="ModelInfer"):
        DirectServicer({name: None for name in RPCS if name != "ModelInfer"}, 1)
