"""The direct HTTP door on its own: uvicorn on loopback running a given ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from helpers import free_port, held_port, run_async, until
from serving.app.direct import DIRECT_SCOPE, DirectHttpDoor, Routes, start_direct_http_door

PORT = free_port()
URL = f"http://127.0.0.1:{PORT}"


class Replica:
    """An app like the replica's: ``/answer`` names the replica and whether the request came
    through the direct door; the first ``held`` requests wait until :attr:`release` is set.
    :attr:`entered` counts the requests that reached it."""

    def __init__(self, name: str, held: int = 0) -> None:
        self.name, self.held = name, held
        self.entered = 0
        self.release = asyncio.Event()

    def app(self) -> Starlette:
        async def answer(request: Request) -> JSONResponse:
            self.entered += 1
            if self.entered <= self.held:
                await self.release.wait()
            body = await request.body()
            direct = bool(request.scope.get(DIRECT_SCOPE))
            return JSONResponse({"replica": self.name, "direct": direct, "bytes": len(body)})

        return Starlette(routes=[Route("/answer", answer, methods=["POST"])])


async def start(replica: Replica, port: int = PORT, max_in_flight: int = 16) -> DirectHttpDoor:
    return await start_direct_http_door(
        replica.app(), host="127.0.0.1", port=port, max_in_flight=max_in_flight, drain_s=5.0
    )


@contextlib.asynccontextmanager
async def doors(*replicas: Replica, max_in_flight: int = 16) -> AsyncIterator[list[DirectHttpDoor]]:
    """A door for each of ``replicas``, all on ``PORT``, stopped at the end."""
    started = [await start(replica, max_in_flight=max_in_flight) for replica in replicas]
    try:
        yield started
    finally:
        for door in started:
            await door.stop()


async def post(client: httpx.AsyncClient | None = None) -> httpx.Response:
    """One request, over ``client``'s connection or a new one."""
    if client is not None:
        return await client.post(f"{URL}/answer", content=b"12345")
    async with httpx.AsyncClient(timeout=10) as fresh:
        return await fresh.post(f"{URL}/answer", content=b"12345")


def test_the_door_runs_the_app_and_marks_its_requests():
    async def test() -> None:
        async with doors(Replica("a")):
            answer = await post()
        assert answer.status_code == 200
        assert answer.json() == {"replica": "a", "direct": True, "bytes": 5}
        assert "server" not in answer.headers  # no uvicorn banner

    run_async(test)


def test_routes_answer_posts_to_their_paths_and_hand_the_rest_to_the_app():
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        return JSONResponse({"name": name, "version": version, "bytes": len(await request.body())})

    async def app_answer(request: Request) -> Response:
        return JSONResponse({"app": request.method + " " + request.url.path})

    app = Starlette(routes=[Route("/{path:path}", app_answer, methods=["GET", "POST"])])
    routes = Routes(
        app,
        {"/v2/models/{name}/infer": infer, "/v2/models/{name}/versions/{version}/infer": infer},
    )

    async def test() -> None:
        transport = httpx.ASGITransport(routes)
        async with httpx.AsyncClient(transport=transport, base_url="http://door") as client:
            answers = [
                (await client.post(path, content=b"123")).json()
                for path in (
                    "/v2/models/m/infer",
                    "/v2/models/m/versions/7/infer",
                    "/v2/models/a/b/infer",
                    "/v2/models/m/infer/",
                    "/v2/models/m",
                )
            ]
            fetched = (await client.get("/v2/models/m/infer")).json()
        assert answers == [
            {"name": "m", "version": None, "bytes": 3},
            {"name": "m", "version": "7", "bytes": 3},
            {"app": "POST /v2/models/a/b/infer"},
            {"app": "POST /v2/models/m/infer/"},
            {"app": "POST /v2/models/m"},
        ]
        assert fetched == {"app": "GET /v2/models/m/infer"}

    run_async(test)


def test_requests_past_the_concurrency_bound_are_refused_not_queued():
    async def test() -> None:
        replica = Replica("a", held=2)
        async with doors(replica, max_in_flight=2), httpx.AsyncClient(timeout=10) as client:
            calls = [asyncio.ensure_future(post(client)) for _ in range(4)]
            await until(lambda: replica.entered == 2 and sum(c.done() for c in calls) == 2)
            replica.release.set()
            answers = await asyncio.gather(*calls)
        assert sorted(a.status_code for a in answers) == [200, 200, 503, 503]
        refused = [a for a in answers if a.status_code == 503]
        assert all(a.headers["retry-after"] == "1" for a in refused)
        assert all("backpressure" in a.json()["error"] for a in refused)  # clients retry these
        assert replica.entered == 2

    run_async(test)


def test_replicas_share_the_port_and_a_stopped_one_leaves_it_to_the_other():
    async def test() -> None:
        async with doors(Replica("a"), Replica("b")) as (first, _):
            # New connections are spread over both.
            assert {(await post()).json()["replica"] for _ in range(40)} == {"a", "b"}
            await first.stop()
            assert {(await post()).json()["replica"] for _ in range(10)} == {"b"}

    run_async(test)


def test_a_stopping_door_finishes_the_requests_in_flight():
    async def test() -> None:
        replica = Replica("a", held=1)
        async with doors(replica) as (door,):
            call = asyncio.ensure_future(post())
            await until(lambda: replica.entered == 1)
            stopping = asyncio.ensure_future(door.stop())
            await until(lambda: door.server.should_exit)
            await asyncio.sleep(0.3)  # uvicorn closes its listener within a tick
            with pytest.raises(httpx.ConnectError):  # no new connection is taken
                await post()
            assert not call.done()
            replica.release.set()
            await stopping
            answer = await call
        assert answer.status_code == 200 and answer.json()["replica"] == "a"

    run_async(test)


def test_a_port_held_by_another_program_is_a_clear_error():
    async def test() -> None:
        with (
            held_port() as port,
            pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"),
        ):
            await start(Replica("a"), port)

    run_async(test)


# Python calls the replica's async __del__ once more as it collects the object: Serve awaits it.
@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")
def test_a_stopping_replica_drains_its_two_direct_doors_at_once() -> None:
    from serving.app.server import ModelServer

    stopping: list[str] = []

    class Door:
        """Stops once both doors are stopping: one drained after the other never would."""

        def __init__(self, name: str) -> None:
            self.name = name

        async def stop(self, *_: float) -> None:
            stopping.append(self.name)
            await until(lambda: len(stopping) == 2)

    async def stop_replica() -> None:
        replica = object.__new__(ModelServer.func_or_class)
        replica._direct_grpc, replica._direct_http = Door("grpc"), Door("http")
        await replica.__del__()
        assert replica._direct_grpc is None and replica._direct_http is None

    run_async(stop_replica, timeout_s=5.0)
    assert sorted(stopping) == ["grpc", "http"]
