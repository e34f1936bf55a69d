"""One error tree: every error espro raises on purpose is an EsproError, the service's carry an
HTTP status and a gRPC code, the client maps both to its classes by code alone, and ``espro``
prints any EsproError as one line. Needs no Ray."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from espro_client import (
    BadRequest,
    NotFound,
    Retry,
    Timeout,
    TLSError,
    Unauthorized,
    Unavailable,
)
from espro_client import EsproError as ClientError
from espro_client import _grpc as client_grpc
from espro_client._http import http_error
from espro_client._proto import grpc_predict_v2_pb2_grpc as pb_grpc
from espro_client._tls import Tls
from espro_client.errors import error_class

from serving import cli
from serving.errors import (
    GRPC_CODES,
    STATUS_TRAILER,
    BundleError,
    CommandError,
    DeployError,
    DeviceError,
    EsproError,
    InputError,
    JSONError,
    ServiceError,
)
from training.errors import CheckpointError, ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
VALUE_ERRORS = [
    InputError,
    BundleError,
    CommandError,
    DeviceError,
    ConfigError,
    DataError,
    CheckpointError,
]


# --------------------------------------------------------------------------- the tree


@pytest.mark.parametrize("kind", [*VALUE_ERRORS, DeployError, ServiceError, JSONError])
def test_every_error_is_an_espro_error(kind: type[Exception]) -> None:
    assert issubclass(kind, EsproError)


@pytest.mark.parametrize("kind", VALUE_ERRORS)
def test_refusals_of_a_value_are_value_errors(kind: type[Exception]) -> None:
    assert issubclass(kind, ValueError)


def test_deploy_error_is_a_runtime_error_and_json_error_a_service_error() -> None:
    assert issubclass(DeployError, RuntimeError)
    err = JSONError("the body is not valid JSON")
    assert isinstance(err, ServiceError) and err.status == 400
    assert JSONError("too long", 413).status == 413


def _public_errors(package: str) -> dict[str, str]:
    """Every public class named ``*Error`` defined in ``package``, by name, with its file."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            public = isinstance(node, ast.ClassDef) and not node.name.startswith("_")
            if public and node.name.endswith("Error"):
                found[node.name] = str(path.relative_to(ROOT))
    return found


def test_errors_are_defined_in_the_errors_modules_only() -> None:
    found = {**_public_errors("serving"), **_public_errors("training")}
    elsewhere = {
        n: p for n, p in found.items() if p not in ("serving/errors.py", "training/errors.py")
    }
    assert elsewhere == {}


def test_importing_the_tree_imports_neither_grpc_nor_pydantic() -> None:
    code = (
        "import sys, serving.errors, training.errors\n"
        "loaded = {'grpc', 'pydantic', 'torch'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- ServiceError


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (404, grpc.StatusCode.NOT_FOUND),
        (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (422, grpc.StatusCode.INVALID_ARGUMENT),
        (500, grpc.StatusCode.INTERNAL),
        (503, grpc.StatusCode.UNAVAILABLE),
        (418, grpc.StatusCode.INTERNAL),
    ],
)
def test_a_service_error_has_the_grpc_code_of_its_status(
    status: int, code: grpc.StatusCode
) -> None:
    err = ServiceError(status, "why")
    assert err.grpc_code is code
    assert (err.status, err.message, str(err)) == (status, "why", "why")
    assert err.rest_body() == b'{"error": "why"}'


@pytest.mark.parametrize("status", [*GRPC_CODES, 500])
def test_the_client_reads_a_status_and_its_grpc_code_as_the_same_error(status: int) -> None:
    """What espro answers over HTTP and over gRPC is the same error class in the client."""
    assert error_class(status) is error_class(ServiceError(status, "").grpc_code.name)


def test_the_client_knows_the_servers_trailer() -> None:
    assert client_grpc.STATUS_TRAILER == STATUS_TRAILER


# --------------------------------------------------------------------------- client over HTTP

HTTP_KINDS = [
    (400, BadRequest),
    (413, BadRequest),
    (422, BadRequest),
    (401, Unauthorized),
    (403, Unauthorized),
    (404, NotFound),
    (429, Unavailable),
    (503, Unavailable),
    (408, Timeout),
    (504, Timeout),
    (500, ClientError),
]


@pytest.mark.parametrize(("status", "kind"), HTTP_KINDS)
@pytest.mark.parametrize("message", ["bad input", "internal error", "backpressure"])
def test_the_client_maps_an_http_status_whatever_the_message(
    status: int, kind: type[ClientError], message: str
) -> None:
    err = http_error(httpx.Response(status, json={"error": message}))
    assert type(err) is kind
    assert (err.status, err.message) == (status, message)


@pytest.mark.parametrize(
    ("status", "kind"), [(500, Unavailable), (502, Unavailable), (504, Timeout), (404, NotFound)]
)
def test_an_answer_without_espros_body_is_a_proxys(status: int, kind: type[ClientError]) -> None:
    """Without espro's JSON error body a 500 or 502 means no model answered (retried)."""
    err = http_error(httpx.Response(status, text="internal error; the server log has details"))
    assert type(err) is kind and err.status == status


def test_unavailable_carries_retry_after() -> None:
    err = http_error(httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "2"}))
    assert isinstance(err, Unavailable) and err.retry_after == 2.0


# --------------------------------------------------------------------------- client over gRPC


class FakeRpcError(grpc.RpcError):
    """A failed RPC as grpc raises it: a code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, status: int | None = None) -> None:
        self._code, self._details = code, details
        self._trailers = () if status is None else ((STATUS_TRAILER, str(status)),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        # espro's own answers: its trailer's status decides
        (Code.INVALID_ARGUMENT, 400, BadRequest),
        (Code.INVALID_ARGUMENT, 422, BadRequest),
        (Code.RESOURCE_EXHAUSTED, 413, BadRequest),
        (Code.UNAUTHENTICATED, 401, Unauthorized),
        (Code.NOT_FOUND, 404, NotFound),
        (Code.UNAVAILABLE, 503, Unavailable),
        (Code.RESOURCE_EXHAUSTED, 503, Unavailable),  # a direct door at its bound
        (Code.INTERNAL, 500, ClientError),
        # anyone else's: the code decides
        (Code.INVALID_ARGUMENT, None, BadRequest),
        (Code.RESOURCE_EXHAUSTED, None, BadRequest),  # gRPC's message size limit
        (Code.UNAUTHENTICATED, None, Unauthorized),
        (Code.PERMISSION_DENIED, None, Unauthorized),
        (Code.NOT_FOUND, None, NotFound),
        (Code.UNAVAILABLE, None, Unavailable),
        (Code.DEADLINE_EXCEEDED, None, Timeout),
        (Code.INTERNAL, None, Unavailable),  # Serve's proxy: the replica died
        (Code.UNKNOWN, None, Unavailable),
        (Code.UNIMPLEMENTED, None, ClientError),
    ],
)
@pytest.mark.parametrize("details", ["internal error; the server log has the details", "oops"])
def test_the_client_maps_a_grpc_code_and_espros_status_whatever_the_details(
    code: grpc.StatusCode, status: int | None, kind: type[ClientError], details: str
) -> None:
    err = client_grpc._rpc_error(FakeRpcError(code, details, status))
    assert type(err) is kind
    assert err.status == code.name and details in err.message


def test_serves_backpressure_is_unavailable() -> None:
    """Serve's proxy past a full queue: ``RESOURCE_EXHAUSTED`` with no trailer, as for a message
    over gRPC's size limit; its details are all that tell the two apart."""
    details = "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1)."
    err = client_grpc._rpc_error(FakeRpcError(Code.RESOURCE_EXHAUSTED, details))
    assert isinstance(err, Unavailable)


HANDSHAKE = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9000: Tls "
    "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
    "routines:OPENSSL_internal:{}: OK"
)
"""gRPC's details for a failed TLS handshake."""


@pytest.mark.parametrize(
    ("details", "kind", "message"),
    [
        (
            HANDSHAKE.format("CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"),
            TLSError,
            "certificate does not verify (unable to get local issuer certificate)",
        ),
        (HANDSHAKE.format("WRONG_VERSION_NUMBER"), TLSError, "TLS handshake failed"),
        ("failed to connect to all addresses; last error: Socket closed", Unavailable, "Socket"),
    ],
)
def test_a_failed_tls_handshake_is_a_tls_error(
    details: str, kind: type[ClientError], message: str
) -> None:
    """Told by gRPC's details alone: it has no other sign of one."""
    err = client_grpc._rpc_error(FakeRpcError(Code.UNAVAILABLE, details))
    assert type(err) is kind and message in err.message


class Refusing(pb_grpc.GRPCInferenceServiceServicer):
    """``ModelMetadata`` answered as espro's doors refuse: the code, the details and the HTTP
    status in the trailer; ``ServerLive`` fails as a proxy does, without the trailer."""

    def __init__(self, err: ServiceError) -> None:
        self.err, self.calls = err, 0

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        context.set_trailing_metadata([(STATUS_TRAILER, str(self.err.status))])
        context.abort(self.err.grpc_code, self.err.message)

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        context.abort(grpc.StatusCode.INTERNAL, "The actor died unexpectedly")


@pytest.fixture
def refusing() -> Iterator[tuple[str, Refusing]]:
    servicer = Refusing(ServiceError(500, "internal error; the server log has the details"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_espros_internal_error_is_not_retried_and_a_proxys_is(
    refusing: tuple[str, Refusing],
) -> None:
    url, servicer = refusing
    retry = Retry(attempts=3, backoff=0.0)
    door = client_grpc.GrpcDoor()
    transport = client_grpc.GrpcTransport(url, timeout=10, headers={}, tls=Tls())
    try:
        with pytest.raises(ClientError, match="internal error") as err:
            retry.call(lambda: transport.send(door.metadata("m", None)))
        assert type(err.value) is ClientError and servicer.calls == 1
        with pytest.raises(Unavailable, match="no model answered"):
            retry.call(lambda: transport.send(door.live()))
        assert servicer.calls == 1 + 3
    finally:
        transport.close()


def test_the_async_client_reads_the_trailer_too(refusing: tuple[str, Refusing]) -> None:
    url, _ = refusing
    door = client_grpc.GrpcDoor()

    async def send() -> None:
        transport = client_grpc.AsyncGrpcTransport(url, timeout=10, headers={}, tls=Tls())
        try:
            await transport.send(door.metadata("m", None))
        finally:
            await transport.close()

    with pytest.raises(ClientError) as err:
        asyncio.run(send())
    assert type(err.value) is ClientError and err.value.status == "INTERNAL"


# --------------------------------------------------------------------------- the command line


class UnlistedError(BundleError):
    """A subclass no command line lists by name."""


@pytest.mark.parametrize(
    "err",
    [
        UnlistedError("b/manifest.json: unlisted"),
        DataError("data.root: unreadable\nsecond line"),
        FileExistsError("runs/x already exists; pass --overwrite to replace it"),
    ],
)
def test_espro_prints_any_espro_error_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], err: Exception
) -> None:
    def refuse(args: Any) -> int:
        raise err

    monkeypatch.setattr(cli, "_predict", refuse)
    assert cli.main(["predict", "bundle", "x.npy"]) == 2
    printed = capsys.readouterr().err
    assert printed == f"error: {' '.join(str(err).splitlines())}\n"


def test_a_trainer_command_raises_its_errors_to_espro(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from training import cli as training_cli

    def refuse(args: Any) -> int:
        raise CheckpointError("runs/x.work: belongs to another configuration")

    monkeypatch.setattr(training_cli, "_configs", refuse)
    assert cli.main(["configs"]) == 2
    assert capsys.readouterr().err == "error: runs/x.work: belongs to another configuration\n"


def test_a_bug_is_not_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args: Any) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_predict", fail)
    with pytest.raises(KeyError):
        cli.main(["predict", "bundle", "x.npy"])
