"""espro_client against the real server over every transport, and against stub servers that
fail on purpose (retries), plus its independence from torch and Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
import torch
from espro_client import (
    AsyncClient,
    BadRequest,
    Client,
    EsproError,
    NotFound,
    Prediction,
    Retry,
    Timeout,
    Unavailable,
)
from espro_client._proto import grpc_predict_v2_pb2 as pb
from espro_client._proto import grpc_predict_v2_pb2_grpc as pb_grpc
from espro_client.cli import main

from conftest import CLASS_NAMES
from serving.bundle import load_bundle
from serving.oip import INTERNAL_ERROR
from serving.predictor import Predictor

TRANSPORTS = ["http", "rest", "grpc"]
X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
FAST = Retry(attempts=3, backoff=0.01)


def client(server: Any, transport: str, **options: Any) -> Client:
    url = f"grpc://{server.grpc}" if transport == "grpc" else server.http
    return Client(url, transport=transport, **options)  # type: ignore[arg-type]


def reference(server: Any, key: str = "tiny/2", **options: Any) -> Any:
    """What the bundle predicts in-process."""
    return Predictor(load_bundle(server.bundles[key])).predict(torch.from_numpy(X), **options)


def assert_matches(p: Prediction, ref: Any, transport: str) -> None:
    """Every field of ``p`` equals the in-process prediction ``ref``."""
    close = {"rtol": 0, "atol": 1e-5}
    np.testing.assert_allclose(p.probabilities, ref.probs.numpy(), **close)
    np.testing.assert_array_equal(p.labels, ref.labels.numpy())
    for name in ("confidence", "entropy", "expected_entropy", "mutual_information"):
        np.testing.assert_allclose(getattr(p, name), getattr(ref, name).numpy(), **close)
    np.testing.assert_allclose(p.disagreement, ref.disagreement.numpy(), **close)
    np.testing.assert_array_equal(p.abstain, ref.abstain.numpy())
    sets = ref.prediction_sets.numpy()
    assert p.class_names.tolist() == [CLASS_NAMES[c] for c in ref.labels.tolist()]
    if transport == "http":
        assert p.prediction_sets is None
        assert p.prediction_set_names == [[CLASS_NAMES[c] for c in np.flatnonzero(s)] for s in sets]
    else:
        np.testing.assert_array_equal(p.prediction_sets, sets)
        assert p.prediction_set_names is None
    assert p.probabilities.dtype == np.float32 and p.labels.dtype == np.int64


# --------------------------------------------------------------------------- real server


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_predict_matches_the_bundle(server: Any, transport: str) -> None:
    with client(server, transport) as c:
        p = c.predict("tiny", X.tolist())
    assert_matches(p, reference(server), transport)
    assert (p.model_name, p.model_version, len(p)) == ("tiny", "2", 5)
    digest = load_bundle(server.bundles["tiny/2"]).digest
    assert p.bundle_sha256 == digest
    assert p.member_probabilities is None


def test_transports_agree_and_binary_is_optional(server: Any) -> None:
    with Client(server.http, transport="rest", binary=False) as c:
        json_tensors = c.predict("tiny", X)
    for transport in TRANSPORTS:
        with client(server, transport) as c:
            p = c.predict("tiny", X)
        np.testing.assert_array_equal(p.probabilities, json_tensors.probabilities)
        np.testing.assert_array_equal(p.mutual_information, json_tensors.mutual_information)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chunks_are_concatenated(server: Any, transport: str) -> None:
    with client(server, transport, chunk_size=2) as c:
        p = c.predict("tiny", X)
    assert_matches(p, reference(server), transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_draws_and_members(server: Any, transport: str) -> None:
    with client(server, transport, chunk_size=3) as c:
        p = c.predict("tiny", X, draws=1, return_members=True)
    ref = reference(server, draws=1, return_members=True)
    assert_matches(p, ref, transport)
    members = ref.member_probs.transpose(0, 1).numpy()  # [B, S, C]
    assert p.member_probabilities.shape == (5, 2, 3)  # 2 simplexes x 1 draw
    np.testing.assert_allclose(p.member_probabilities, members, rtol=0, atol=1e-5)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_an_older_version(server: Any, transport: str) -> None:
    with client(server, transport) as c:
        p = c.predict("tiny", X, version="1")
    assert p.model_version == "1"
    assert_matches(p, reference(server, "tiny/1"), transport)
    assert p.bundle_sha256 == load_bundle(server.bundles["tiny/1"]).digest


def test_the_native_door_cannot_pick_a_version(server: Any) -> None:
    with Client(server.http) as c, pytest.raises(ValueError, match="newest version"):
        c.predict("tiny", X, version="1")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_errors_carry_the_servers_message(server: Any, transport: str) -> None:
    grpc_ = transport == "grpc"
    with client(server, transport) as c:
        with pytest.raises(NotFound, match="unknown model 'nope'") as err:
            c.predict("nope", X)
        assert err.value.status == ("NOT_FOUND" if grpc_ else 404)
        with pytest.raises(BadRequest, match=r"\(4,\)|shape") as err:
            c.predict("tiny", X[:, :3])
        assert err.value.status == ("INVALID_ARGUMENT" if grpc_ else 400)
        with pytest.raises(BadRequest, match="draws") as err:
            c.predict("tiny", X, draws=99)
        assert "draws" in err.value.message
        with pytest.raises(ValueError, match="B ≥ 1"):
            c.predict("tiny", np.zeros((0, 4)))


def test_a_body_over_the_limit_is_a_bad_request(server: Any) -> None:
    big = np.zeros((70_000, 4), np.float32)  # 1.1 MB of binary tensor, the limit is 1 MiB
    with Client(server.http, transport="rest", chunk_size=len(big)) as c:
        with pytest.raises(BadRequest) as err:
            c.predict("tiny", big)
        assert err.value.status == 413 and "limit" in err.value.message
        c.chunk_size = 20_000
        assert len(c.predict("tiny", big)) == len(big)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_ready_and_metadata(server: Any, transport: str) -> None:
    with client(server, transport) as c:
        assert c.health() and c.ready() and c.ready("tiny") and c.ready("tiny", "1")
        assert not c.ready("nope") and not c.ready("tiny", "9")
        metadata = c.metadata("tiny")
        assert metadata.name == "tiny" and metadata.versions == ["1", "2"]
        assert metadata.inputs[0].shape == [-1, 4] and metadata.inputs[0].datatype == "FP32"
        outputs = {t.name: (t.datatype, t.shape) for t in metadata.outputs}
        assert outputs["probabilities"] == ("FP32", [-1, 3])
        assert outputs["prediction_set"] == ("BOOL", [-1, 3])
        with pytest.raises(NotFound):
            c.metadata("tiny", "9")


@pytest.mark.parametrize("transport", ["http", "rest"])
def test_models(server: Any, transport: str) -> None:
    with client(server, transport) as c:
        models = {m.name: m for m in c.models()}
    assert set(models) == {"tiny", "tiny-bn", "slow"}
    versions = {v.version: v.bundle_sha256 for v in models["tiny"].versions}
    assert versions == {
        "1": load_bundle(server.bundles["tiny/1"]).digest,
        "2": load_bundle(server.bundles["tiny/2"]).digest,
    }


def test_grpc_has_no_model_list(server: Any) -> None:
    with client(server, "grpc") as c, pytest.raises(NotImplementedError, match="HTTP"):
        c.models()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_client(server: Any, transport: str) -> None:
    url = f"grpc://{server.grpc}" if transport == "grpc" else server.http

    async def run() -> tuple[list[Prediction], bool, bool]:
        async with AsyncClient(url, transport=transport, chunk_size=2) as c:  # type: ignore[arg-type]
            predictions = await asyncio.gather(
                c.predict("tiny", X), c.predict("tiny", X, draws=1, return_members=True)
            )
            with pytest.raises(NotFound, match="nope"):
                await c.predict("nope", X)
            return list(predictions), await c.health(), await c.ready("tiny")

    (p, members), live, ready = asyncio.run(run())
    assert live and ready
    assert_matches(p, reference(server), transport)
    assert_matches(members, reference(server, draws=1, return_members=True), transport)
    assert members.member_probabilities.shape == (5, 2, 3)
    assert p.bundle_sha256 == load_bundle(server.bundles["tiny/2"]).digest


def test_cli(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "x.npy"
    np.save(inputs, X)
    assert main(["predict", server.http, str(inputs), "--model", "tiny", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(printed["probabilities"], reference(server).probs, atol=1e-5)
    assert main(["predict", f"grpc://{server.grpc}", str(inputs), "--model", "tiny"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("tiny:2") and table[1].split()[:2] == ["#", "label"]
    assert len(table) == 2 + len(X)
    assert main(["models", server.http]) == 0
    assert "tiny-bn" in capsys.readouterr().out
    assert main(["health", server.http, "--transport", "rest"]) == 0
    assert json.loads(capsys.readouterr().out) == {"live": True, "ready": True}
    assert main(["predict", server.http, str(inputs)]) == 1  # three models: which one?
    assert "--model" in capsys.readouterr().err


# --------------------------------------------------------------------------- stub servers


class Stub(BaseHTTPRequestHandler):
    """Answers each request with the next of ``answers`` (status, body), counting them."""

    answers: ClassVar[list[tuple[int, dict[str, Any] | str]]] = []
    """JSON bodies, or plain-text ones as a proxy or gateway sends them."""
    requests: ClassVar[int] = 0
    delay: ClassVar[float] = 0.0
    """Seconds to wait before answering."""

    def do_GET(self) -> None:
        status, body = type(self).answers[type(self).requests]
        type(self).requests += 1
        time.sleep(type(self).delay)
        text = isinstance(body, str)
        payload = body.encode() if text else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[Stub]]]:
    handler = type("Handler", (Stub,), {"answers": [], "requests": 0})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", handler
    httpd.shutdown()
    httpd.server_close()


MODELS = {"models": [{"name": "m", "versions": [{"version": "1", "bundle_sha256": "ab"}]}]}


def test_503_is_retried(stub: tuple[str, type[Stub]]) -> None:
    url, handler = stub
    handler.answers = [(503, {"error": "queue full"})] * 2 + [(200, MODELS)]
    with Client(url, retry=FAST) as c:
        assert c.models()[0].versions[0].bundle_sha256 == "ab"
    assert handler.requests == 3


def test_retries_give_up(stub: tuple[str, type[Stub]]) -> None:
    url, handler = stub
    handler.answers = [(503, {"error": "queue full"})] * 3
    with Client(url, retry=FAST) as c, pytest.raises(Unavailable, match="queue full") as err:
        c.models()
    assert handler.requests == 3 and err.value.status == 503


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [(400, {"error": "bad input"}, "bad input"), (422, {"detail": [{"msg": "x"}]}, '"msg"')],
)
def test_4xx_is_not_retried(
    stub: tuple[str, type[Stub]], status: int, body: dict[str, Any], message: str
) -> None:
    url, handler = stub
    handler.answers = [(status, body), (200, MODELS)]
    with Client(url, retry=FAST) as c, pytest.raises(BadRequest, match=message) as err:
        c.models()
    assert handler.requests == 1 and err.value.status == status


def test_a_500_that_no_model_sent_is_retried(stub: tuple[str, type[Stub]]) -> None:
    url, handler = stub
    died = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."
    handler.answers = [(500, died), (502, "Bad Gateway"), (200, MODELS)]
    with Client(url, retry=FAST) as c:
        assert c.models()[0].name == "m"
    assert handler.requests == 3


def test_espros_own_500_is_not_retried(stub: tuple[str, type[Stub]]) -> None:
    url, handler = stub
    handler.answers = [(500, {"error": "internal error; the server log has details"})] * 2
    with Client(url, retry=FAST) as c, pytest.raises(EsproError, match="internal error") as err:
        c.models()
    assert handler.requests == 1 and not isinstance(err.value, Unavailable)


@pytest.mark.parametrize(("timeouts", "requests"), [(True, 3), (False, 1)])
def test_a_slow_answer_is_a_timeout_retried_unless_told_not_to(
    stub: tuple[str, type[Stub]], timeouts: bool, requests: int
) -> None:
    url, handler = stub
    handler.answers, handler.delay = [(200, MODELS)] * 3, 1.0
    retry = dataclasses.replace(FAST, timeouts=timeouts)
    with Client(url, timeout=0.2, retry=retry) as c, pytest.raises(Timeout, match="no answer"):
        c.models()
    assert handler.requests == requests


def test_the_servers_408_is_a_timeout_and_retried(stub: tuple[str, type[Stub]]) -> None:
    url, handler = stub
    handler.answers = [(408, "Request 1a2b timed out after 60.0s."), (200, MODELS)]
    with Client(url, retry=FAST) as c:
        assert c.models()[0].name == "m"
    assert handler.requests == 2
    handler.requests, handler.answers = 0, [(408, "timed out")]
    with Client(url, retry=Retry(attempts=1)) as c, pytest.raises(Timeout) as err:
        c.models()
    assert err.value.status == 408


def test_async_retries(stub: tuple[str, type[Stub]]) -> None:
    url, handler = stub
    handler.answers = [(503, {"error": "busy"}), (200, MODELS)]

    async def run() -> list[Any]:
        async with AsyncClient(url, retry=FAST) as c:
            return await c.models()

    assert asyncio.run(run())[0].name == "m" and handler.requests == 2


def test_connection_failures_are_retried_then_unavailable() -> None:
    with Client("http://127.0.0.1:9", retry=FAST) as c:
        assert not c.health()
        with pytest.raises(Unavailable, match="Connect"):
            c.models()


class FlakyInference(pb_grpc.GRPCInferenceServiceServicer):
    """``ModelMetadata`` fails with each of ``codes`` in turn (with ``details``), then
    answers."""

    def __init__(self, codes: list[grpc.StatusCode], details: str) -> None:
        self.codes, self.details, self.calls = codes, details, 0

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.calls <= len(self.codes):
            context.abort(self.codes[self.calls - 1], self.details)
        return pb.ModelMetadataResponse(name=request.name, platform="stub")


BACKPRESSURE = "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1)."
"""What Serve's gRPC proxy says past a full queue, with RESOURCE_EXHAUSTED."""


@pytest.mark.parametrize(
    ("codes", "details", "calls", "error"),
    [
        ([grpc.StatusCode.UNAVAILABLE] * 2, "try again", 3, None),
        ([grpc.StatusCode.DEADLINE_EXCEEDED] * 2, "Request timed out after 60.0s.", 3, None),
        ([grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, BACKPRESSURE, 3, None),
        ([grpc.StatusCode.INTERNAL] * 2, "The actor died unexpectedly", 3, None),
        ([grpc.StatusCode.INVALID_ARGUMENT], "bad shape", 1, BadRequest),
        ([grpc.StatusCode.RESOURCE_EXHAUSTED], "larger than max (9 vs. 8)", 1, BadRequest),
        ([grpc.StatusCode.INTERNAL], INTERNAL_ERROR, 1, EsproError),
    ],
)
def test_grpc_retries(
    codes: list[grpc.StatusCode],
    details: str,
    calls: int,
    error: type | None,
) -> None:
    servicer = FlakyInference(codes, details)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with Client(f"grpc://127.0.0.1:{port}", transport="grpc", retry=FAST) as c:
            if error is None:
                assert c.metadata("m").platform == "stub"
            else:
                with pytest.raises(error, match=re.escape(details)) as err:
                    c.metadata("m")
                assert err.value.status == codes[0].name
    finally:
        grpc_server.stop(None)
    assert servicer.calls == calls


# --------------------------------------------------------------------------- packaging


def test_imports_without_torch_or_ray() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'ray', 'serving', 'pydantic', 'fastapi'):\n"
        "    sys.modules[name] = None\n"
        "import espro_client, espro_client._grpc, espro_client.cli\n"
        "espro_client.Client('grpc://127.0.0.1:1', transport='grpc').close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_client_speaks_the_servers_proto_and_its_stubs_are_current(tmp_path: Path) -> None:
    from espro_client._proto import generate as client_proto

    import serving.proto

    def definitions(path: Path) -> list[str]:  # the proto without its comments
        return [line for line in path.read_text().splitlines() if not line.startswith("//")]

    server_proto = Path(serving.proto.__file__).with_name("grpc_predict_v2.proto")
    assert definitions(client_proto.SRC / client_proto.PROTO) == definitions(server_proto)
    client_proto.generate(tmp_path)
    fresh = tmp_path / client_proto.PROTO.parent
    for module in fresh.glob("*.py*"):
        checked_in = client_proto.SRC / client_proto.PROTO.parent / module.name
        assert module.read_text() == checked_in.read_text(), module.name
