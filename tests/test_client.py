"""espro_client: what it sends, how it reads answers and what it retries, against in-process
servers (``httpx.MockTransport`` and a gRPC server on loopback, both answering with espro's
InferenceService); a few checks end to end against the real server; its independence from
torch and Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
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

from helpers import CLASS_NAMES, FP32_ATOL, PETS_IMAGES, tiny_bundle
from serving.bundle import load_bundle
from serving.errors import STATUS_TRAILER, ServiceError
from serving.predictor import Predictor
from serving.proto import grpc_predict_v2_pb2_grpc as server_pb_grpc
from serving.service import InferenceService, ModelRepository, model_list

PROTOCOLS = ["native", "oip-rest", "oip-grpc"]
X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
FAST = Retry(attempts=3, backoff=0.0)
HTTP_URL = "http://espro.test"
"""Where clients of the in-process HTTP server send (no connection is made)."""


def reference(bundle: Path, **options: Any) -> Any:
    """What the bundle predicts in-process."""
    return Predictor(load_bundle(bundle)).predict(torch.from_numpy(X), **options)


def assert_matches(p: Prediction, ref: Any, protocol: str) -> None:
    """Every field of ``p`` equals the in-process prediction ``ref`` (floats to FP32_ATOL)."""
    close = {"rtol": 0, "atol": FP32_ATOL}
    np.testing.assert_allclose(p.probabilities, ref.probs.numpy(), **close)
    np.testing.assert_array_equal(p.labels, ref.labels.numpy())
    for name in ("confidence", "entropy", "expected_entropy", "mutual_information"):
        np.testing.assert_allclose(getattr(p, name), getattr(ref, name).numpy(), **close)
    np.testing.assert_allclose(p.disagreement, ref.disagreement.numpy(), **close)
    np.testing.assert_array_equal(p.abstain, ref.abstain.numpy())
    sets = ref.prediction_sets.numpy()
    assert p.class_names.tolist() == [CLASS_NAMES[c] for c in ref.labels.tolist()]
    if protocol == "native":
        assert p.prediction_sets is None
        assert p.prediction_set_names == [[CLASS_NAMES[c] for c in np.flatnonzero(s)] for s in sets]
    else:
        np.testing.assert_array_equal(p.prediction_sets, sets)
        assert p.prediction_set_names is None
    assert p.probabilities.dtype == np.float32 and p.labels.dtype == np.int64
    if ref.member_probs is None:
        assert p.member_probabilities is None
    else:
        members = ref.member_probs.transpose(0, 1).numpy()  # [B, S, C]
        np.testing.assert_allclose(p.member_probabilities, members, **close)


# --------------------------------------------------------------------------- in-process servers


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``tiny`` versions 1 and 2."""
    root = tmp_path_factory.mktemp("client")
    return {v: tiny_bundle(seed=s, version=v).write(root / v) for s, v in [(0, "1"), (1, "2")]}


@pytest.fixture(scope="module")
def service(bundles: dict[str, Path]) -> InferenceService:
    return InferenceService(ModelRepository([Predictor(load_bundle(b)) for b in bundles.values()]))


class EsproHttp:
    """An ``httpx.MockTransport`` handler that answers predictions, health and the model list
    with an in-process :class:`InferenceService`, as the app's HTTP door does, and records
    every request. Queued ``answers`` (responses, or exceptions to raise) come first."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.requests: list[httpx.Request] = []
        self.answers: list[httpx.Response | Exception] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        path = request.url.path
        try:
            if path == "/v2/health/live":
                return httpx.Response(200, json={"live": True})
            if path == "/v1/models":
                return httpx.Response(200, json=model_list(self.service.repository))
            if native := re.fullmatch(r"/v1/models/([^/]+)/predict", path):
                return httpx.Response(200, content=self.service.native(native[1], request.content))
            if rest := re.fullmatch(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer", path):
                length = request.headers.get("inference-header-content-length")
                body, json_length = self.service.rest_infer(
                    rest[1], rest[2], request.content, None if length is None else int(length)
                )
                headers = {"Inference-Header-Content-Length": str(json_length)}
                return httpx.Response(200, content=body, headers=headers if json_length else {})
        except ServiceError as err:
            return httpx.Response(err.status, json={"error": err.message})
        return httpx.Response(404, json={"error": f"no route {path}"})

    def bodies(self) -> list[Any]:
        """The JSON body of each request."""
        return [json.loads(request.content) for request in self.requests]


class EsproGrpc(server_pb_grpc.GRPCInferenceServiceServicer):
    """``ModelInfer`` answered by an in-process :class:`InferenceService`; each request is
    recorded with its metadata."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.calls: list[tuple[Any, dict[str, str]]] = []

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append((request, dict(context.invocation_metadata())))
        try:
            return self.service.grpc_infer(request)
        except ServiceError as err:
            context.set_trailing_metadata([(STATUS_TRAILER, str(err.status))])
            context.abort(err.grpc_code, err.message)


def http_mock(handler: EsproHttp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every httpx client made from now on sends to ``handler``."""
    mock = httpx.MockTransport(handler)
    monkeypatch.setattr(httpx, "Client", functools.partial(httpx.Client, transport=mock))
    monkeypatch.setattr(httpx, "AsyncClient", functools.partial(httpx.AsyncClient, transport=mock))


@pytest.fixture
def http(service: InferenceService, monkeypatch: pytest.MonkeyPatch) -> EsproHttp:
    handler = EsproHttp(service)
    http_mock(handler, monkeypatch)
    return handler


@dataclass
class InProcess:
    """Both in-process servers, and clients of either."""

    http: EsproHttp
    grpc: EsproGrpc
    grpc_url: str

    def client(self, protocol: str, **options: Any) -> Client:
        url = self.grpc_url if protocol == "oip-grpc" else HTTP_URL
        return Client(url, protocol=protocol, **options)  # type: ignore[arg-type]

    def sent(self, protocol: str) -> int:
        """Requests sent to the server of ``protocol`` so far."""
        return len(self.grpc.calls if protocol == "oip-grpc" else self.http.requests)


@contextmanager
def serving_in_process(http: EsproHttp, service: InferenceService) -> Iterator[InProcess]:
    """``service`` behind ``http`` and a gRPC server on loopback."""
    servicer = EsproGrpc(service)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server_pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield InProcess(http, servicer, f"grpc://127.0.0.1:{port}")
    finally:
        server.stop(None)


@pytest.fixture
def in_process(http: EsproHttp, service: InferenceService) -> Iterator[InProcess]:
    with serving_in_process(http, service) as servers:
        yield servers


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_predictions_match_the_bundle(
    in_process: InProcess, bundles: dict[str, Path], protocol: str
) -> None:
    with in_process.client(protocol) as c:
        p = c.predict("tiny", X.tolist())
        members = c.predict("tiny", X, draws=1, return_members=True)
    assert_matches(p, reference(bundles["2"]), protocol)
    assert (p.model_name, p.model_version, len(p)) == ("tiny", "2", 5)
    assert p.bundle_sha256 == load_bundle(bundles["2"]).digest
    assert_matches(members, reference(bundles["2"], draws=1, return_members=True), protocol)
    assert members.member_probabilities.shape == (5, 2, 3)  # 2 simplexes x 1 draw


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_chunks_are_sent_one_after_another_and_concatenated(
    in_process: InProcess, bundles: dict[str, Path], protocol: str
) -> None:
    with in_process.client(protocol, chunk_size=2) as c:
        p = c.predict("tiny", X)
    assert in_process.sent(protocol) == 3
    assert_matches(p, reference(bundles["2"]), protocol)


@pytest.mark.parametrize(
    ("protocol", "binary"),
    [("native", True), ("oip-rest", True), ("oip-rest", False), ("oip-grpc", True)],
)
def test_predict_images_answers_as_the_decoded_images(
    protocol: str, binary: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.io import encode_png

    from serving.images import decode_images
    from serving.manifest import ImageSpec, InputSpec

    spec = ImageSpec(size=(2, 2), color="grayscale")
    image_input = InputSpec(shape=(1, 2, 2), mean=(0.5,), std=(0.25,), image=spec)
    bundle = tiny_bundle(name="pets", input=image_input).write(tmp_path / "pets")
    predictor = Predictor(load_bundle(bundle))
    handler = EsproHttp(InferenceService(ModelRepository([predictor])))
    http_mock(handler, monkeypatch)
    pngs = [
        encode_png(torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)).numpy().tobytes()
        for _ in range(3)
    ]
    (tmp_path / "cat.png").write_bytes(pngs[0])
    with (
        serving_in_process(handler, handler.service) as servers,
        servers.client(protocol, binary=binary, chunk_size=2) as c,
    ):
        p = c.predict_images("pets", [tmp_path / "cat.png", str(tmp_path / "cat.png"), pngs[2]])
        with pytest.raises(BadRequest, match="image 0 is gif"):
            c.predict_images("pets", [b"GIF89a"])
    assert servers.sent(protocol) == 3
    want = predictor.predict(decode_images([pngs[0], pngs[0], pngs[2]], spec)).probs
    np.testing.assert_allclose(p.probabilities, want.numpy(), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("protocol", ["oip-rest", "oip-grpc"])
def test_an_older_version(in_process: InProcess, bundles: dict[str, Path], protocol: str) -> None:
    with in_process.client(protocol) as c:
        p = c.predict("tiny", X, version="1")
    assert p.model_version == "1" and p.bundle_sha256 == load_bundle(bundles["1"]).digest
    assert_matches(p, reference(bundles["1"]), protocol)


def test_the_native_protocol_cannot_pick_a_version(http: EsproHttp) -> None:
    with Client(HTTP_URL) as c, pytest.raises(ValueError, match="'oip-rest' or 'oip-grpc'"):
        c.predict("tiny", X, version="1")
    assert http.requests == []


def test_oip_grpc_has_no_model_list() -> None:
    no_list = pytest.raises(NotImplementedError, match="'native' or 'oip-rest'")
    with Client("grpc://127.0.0.1:1", protocol="oip-grpc") as c, no_list:
        c.models()


def test_an_unknown_protocol_is_refused_and_the_repr_names_the_protocol() -> None:
    with pytest.raises(ValueError, match="'native', 'oip-rest' or 'oip-grpc', got 'http'"):
        Client(HTTP_URL, protocol="http")  # type: ignore[arg-type]
    with Client(HTTP_URL, protocol="oip-rest") as c:
        assert repr(c) == "Client('http://espro.test', protocol='oip-rest')"
    assert Client(HTTP_URL).protocol == "native"


# --------------------------------------------------------------------------- requests


def test_the_native_request(http: EsproHttp) -> None:
    with Client(HTTP_URL, chunk_size=3) as c:
        c.predict("tiny", X.tolist(), draws=2, return_members=True)
    assert [r.url.path for r in http.requests] == ["/v1/models/tiny/predict"] * 2
    assert http.bodies() == [
        {"inputs": X[:3].tolist(), "draws": 2, "return_members": True},
        {"inputs": X[3:].tolist(), "draws": 2, "return_members": True},
    ]


@pytest.mark.parametrize("binary", [True, False])
def test_the_oip_rest_request(http: EsproHttp, binary: bool) -> None:
    with Client(HTTP_URL, protocol="oip-rest", binary=binary) as c:
        c.predict("tiny", X, draws=1)
    (request,) = http.requests
    tensor = {"name": "input", "shape": [5, 4], "datatype": "FP32"}
    if binary:
        length = int(request.headers["inference-header-content-length"])
        header = json.loads(request.content[:length])
        assert request.headers["content-type"] == "application/octet-stream"
        assert request.content[length:] == X.astype("<f4").tobytes()
        assert header["inputs"] == [tensor | {"parameters": {"binary_data_size": X.nbytes}}]
        assert header["parameters"] == {
            "draws": 1,
            "return_members": False,
            "binary_data_output": True,
        }
    else:
        header = json.loads(request.content)
        assert "inference-header-content-length" not in request.headers
        assert header["inputs"] == [tensor | {"data": X.ravel().tolist()}]
        assert header["parameters"] == {"draws": 1, "return_members": False}


def test_names_are_quoted_into_the_path(http: EsproHttp) -> None:
    with Client(HTTP_URL, protocol="oip-rest") as c, pytest.raises(NotFound):
        c.predict("a b/c", X, version="1/2")
    assert http.requests[0].url.raw_path == b"/v2/models/a%20b%2Fc/versions/1%2F2/infer"


def test_the_oip_grpc_request_and_its_token(in_process: InProcess) -> None:
    with in_process.client("oip-grpc", token="tok") as c:
        c.predict("tiny", X, version="1", draws=1, return_members=True)
    ((request, metadata),) = in_process.grpc.calls
    assert (request.model_name, request.model_version) == ("tiny", "1")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("input", "FP32", [5, 4])
    assert list(request.raw_input_contents) == [X.astype("<f4").tobytes()]
    assert request.parameters["draws"].int64_param == 1
    assert request.parameters["return_members"].bool_param is True
    assert metadata["authorization"] == "Bearer tok"


def test_a_token_is_sent_as_a_bearer_header_on_every_http_call(http: EsproHttp) -> None:
    with Client(HTTP_URL, token="tok", allow_insecure=True) as c:  # a mock: nothing leaves
        assert c.health() and c.models()[0].name == "tiny" and len(c.predict("tiny", X)) == 5
    assert [r.headers["authorization"] for r in http.requests] == ["Bearer tok"] * 3
    with Client(HTTP_URL) as c:
        c.health()
    assert "authorization" not in http.requests[-1].headers


# --------------------------------------------------------------------------- retries

MODELS = {"models": [{"name": "m", "versions": [{"version": "1", "bundle_sha256": "ab"}]}]}


def answer(status: int, body: dict[str, Any] | str, **headers: str) -> httpx.Response:
    """A JSON answer, or a plain-text one as a proxy or gateway sends it."""
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


def test_503_is_retried(http: EsproHttp) -> None:
    http.answers = [answer(503, {"error": "queue full"})] * 2 + [answer(200, MODELS)]
    with Client(HTTP_URL, retry=FAST) as c:
        assert c.models()[0].versions[0].bundle_sha256 == "ab"
    assert len(http.requests) == 3


def test_retries_give_up(http: EsproHttp) -> None:
    http.answers = [answer(503, {"error": "queue full"})] * 3
    with Client(HTTP_URL, retry=FAST) as c, pytest.raises(Unavailable, match="queue full"):
        c.models()
    assert len(http.requests) == 3


@pytest.mark.parametrize(
    ("status", "body"), [(400, {"error": "bad input"}), (422, {"detail": [{"msg": "x"}]})]
)
def test_4xx_is_not_retried(http: EsproHttp, status: int, body: dict[str, Any]) -> None:
    http.answers = [answer(status, body), answer(200, MODELS)]
    with Client(HTTP_URL, retry=FAST) as c, pytest.raises(BadRequest):
        c.models()
    assert len(http.requests) == 1


def test_a_500_that_no_model_sent_is_retried(http: EsproHttp) -> None:
    died = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."
    http.answers = [answer(500, died), answer(502, "Bad Gateway"), answer(200, MODELS)]
    with Client(HTTP_URL, retry=FAST) as c:
        assert c.models()[0].name == "m"
    assert len(http.requests) == 3


def test_espros_own_500_is_not_retried(http: EsproHttp) -> None:
    http.answers = [answer(500, {"error": "internal error; the server log has details"})] * 2
    with Client(HTTP_URL, retry=FAST) as c, pytest.raises(EsproError, match="internal error"):
        c.models()
    assert len(http.requests) == 1


@pytest.mark.parametrize(("timeouts", "requests"), [(True, 3), (False, 1)])
def test_no_answer_in_time_is_a_timeout_retried_unless_told_not_to(
    http: EsproHttp, timeouts: bool, requests: int
) -> None:
    http.answers = [httpx.ReadTimeout("timed out")] * 3
    retry = dataclasses.replace(FAST, timeouts=timeouts)
    with Client(HTTP_URL, retry=retry) as c, pytest.raises(Timeout, match="no answer"):
        c.models()
    assert len(http.requests) == requests


def test_the_servers_408_is_a_timeout_and_retried(http: EsproHttp) -> None:
    http.answers = [answer(408, "Request 1a2b timed out after 60.0s."), answer(200, MODELS)]
    with Client(HTTP_URL, retry=FAST) as c:
        assert c.models()[0].name == "m"
    assert len(http.requests) == 2


def test_async_retries(http: EsproHttp) -> None:
    http.answers = [answer(503, {"error": "busy"}), answer(200, MODELS)]

    async def run() -> list[Any]:
        async with AsyncClient(HTTP_URL, retry=FAST) as c:
            return await c.models()

    assert asyncio.run(run())[0].name == "m" and len(http.requests) == 2


def test_connection_failures_are_retried_then_unavailable(http: EsproHttp) -> None:
    http.answers = [httpx.ConnectError("refused")] * 4
    with Client(HTTP_URL, retry=FAST) as c:
        assert not c.health()  # not retried
        with pytest.raises(Unavailable, match="ConnectError"):
            c.models()
    assert len(http.requests) == 4


# --------------------------------------------------------------------------- command line


def test_the_cli_refuses_a_version_for_the_native_protocol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "x.npy"
    np.save(inputs, X)
    assert main(["predict", HTTP_URL, str(inputs), "--model", "tiny", "--version", "1"]) == 2
    assert "pass --protocol oip-rest or oip-grpc" in capsys.readouterr().err


def test_the_cli_speaks_the_protocol_it_is_told(
    http: EsproHttp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "x.npy"
    np.save(inputs, X)
    command = ["predict", HTTP_URL, str(inputs), "--model", "tiny", "--json"]
    assert main([*command, "--protocol", "oip-rest", "--version", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == "1"
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == "2"
    paths = [r.url.path for r in http.requests]
    assert paths == ["/v2/models/tiny/versions/1/infer", "/v1/models/tiny/predict"]


def test_the_cli_sends_image_files_to_a_model_trained_on_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchvision.io import encode_png

    from serving.images import decode_images
    from serving.manifest import ImageSpec, InputSpec

    spec = ImageSpec(size=(2, 2), color="grayscale")
    image_input = InputSpec(shape=(1, 2, 2), mean=(0.5,), std=(0.25,), image=spec)
    predictor = Predictor(
        load_bundle(tiny_bundle(name="pets", input=image_input).write(tmp_path / "pets"))
    )
    http_mock(EsproHttp(InferenceService(ModelRepository([predictor]))), monkeypatch)
    pngs = [
        encode_png(torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)).numpy().tobytes()
        for _ in range(2)
    ]
    files = [tmp_path / "cat.png", tmp_path / "dog.PNG"]
    for path, data in zip(files, pngs, strict=True):
        path.write_bytes(data)
    assert main(["predict", HTTP_URL, *map(str, files), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    want = predictor.predict(decode_images(pngs, spec)).probs.numpy()
    np.testing.assert_allclose(answer["probabilities"], want, atol=FP32_ATOL, rtol=0)

    np.save(tmp_path / "x.npy", X)
    assert main(["predict", HTTP_URL, str(files[0]), str(tmp_path / "x.npy")]) == 2
    assert "pass one .npy file, or only image files" in capsys.readouterr().err
    assert main(["predict", HTTP_URL, str(tmp_path / "bird.jpg")]) == 2
    assert "bird.jpg: no such image file" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real server


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_server_decodes_images_as_the_bundle_was_trained(server: Any, protocol: str) -> None:
    from torchvision.io import encode_png

    from serving.images import decode_images

    pngs = [
        encode_png(torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8)).numpy().tobytes()
        for _ in range(3)
    ]
    predictor = Predictor(load_bundle(server.bundles["pets"]))
    want = predictor.predict(decode_images(pngs, PETS_IMAGES))
    with real_client(server, protocol) as c:
        p = c.predict_images("pets", pngs)
        with pytest.raises(BadRequest, match="not images"):
            c.predict_images("tiny", pngs[:1])
    np.testing.assert_allclose(p.probabilities, want.probs.numpy(), atol=FP32_ATOL, rtol=0)


def real_client(server: Any, protocol: str, **options: Any) -> Client:
    url = f"grpc://{server.grpc}" if protocol == "oip-grpc" else server.http
    return Client(url, protocol=protocol, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_server_answers_as_the_bundle_predicts(server: Any, protocol: str) -> None:
    with real_client(server, protocol) as c:
        p = c.predict("tiny", X)
        members = c.predict("tiny", X, draws=1, return_members=True)
    assert_matches(p, reference(server.bundles["tiny/2"]), protocol)
    assert (p.model_name, p.model_version) == ("tiny", "2")
    assert p.bundle_sha256 == load_bundle(server.bundles["tiny/2"]).digest
    ref = reference(server.bundles["tiny/2"], draws=1, return_members=True)
    assert_matches(members, ref, protocol)
    if protocol == "oip-rest":
        with real_client(server, protocol, binary=False) as c:
            assert_matches(c.predict("tiny", X), reference(server.bundles["tiny/2"]), protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_servers_refusals_carry_its_message(server: Any, protocol: str) -> None:
    grpc_ = protocol == "oip-grpc"
    with real_client(server, protocol) as c:
        with pytest.raises(NotFound, match="unknown model 'nope'") as err:
            c.predict("nope", X)
        assert err.value.status == ("NOT_FOUND" if grpc_ else 404)
        with pytest.raises(BadRequest, match=r"\(4,\)|shape") as err:
            c.predict("tiny", X[:, :3])
        assert err.value.status == ("INVALID_ARGUMENT" if grpc_ else 400)
        with pytest.raises(BadRequest, match="draws"):
            c.predict("tiny", X, draws=99)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_ready_metadata_and_models(server: Any, protocol: str) -> None:
    with real_client(server, protocol) as c:
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
        if protocol == "oip-grpc":
            return
        models = {m.name: m for m in c.models()}
    assert set(models) == {"tiny", "tiny-bn", "slow", "pets"}
    versions = {v.version: v.bundle_sha256 for v in models["tiny"].versions}
    assert versions == {
        "1": load_bundle(server.bundles["tiny/1"]).digest,
        "2": load_bundle(server.bundles["tiny/2"]).digest,
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client(server: Any, protocol: str) -> None:
    url = f"grpc://{server.grpc}" if protocol == "oip-grpc" else server.http

    async def run() -> tuple[list[Prediction], bool, bool]:
        async with AsyncClient(url, protocol=protocol, chunk_size=2) as c:  # type: ignore[arg-type]
            predictions = await asyncio.gather(
                c.predict("tiny", X), c.predict("tiny", X, draws=1, return_members=True)
            )
            with pytest.raises(NotFound, match="nope"):
                await c.predict("nope", X)
            return list(predictions), await c.health(), await c.ready("tiny")

    (p, members), live, ready = asyncio.run(run())
    assert live and ready
    assert_matches(p, reference(server.bundles["tiny/2"]), protocol)
    ref = reference(server.bundles["tiny/2"], draws=1, return_members=True)
    assert_matches(members, ref, protocol)


def test_cli(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "x.npy"
    np.save(inputs, X)
    assert main(["predict", server.http, str(inputs), "--model", "tiny", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = reference(server.bundles["tiny/2"]).probs
    np.testing.assert_allclose(printed["probabilities"], expected, atol=FP32_ATOL)
    assert main(["predict", f"grpc://{server.grpc}", str(inputs), "--model", "tiny"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("tiny:2") and table[1].split()[:2] == ["#", "label"]
    assert len(table) == 2 + len(X)
    assert main(["models", server.http]) == 0
    assert "tiny-bn" in capsys.readouterr().out
    assert main(["health", server.http, "--protocol", "oip-rest"]) == 0
    assert json.loads(capsys.readouterr().out) == {"live": True, "ready": True}
    assert main(["predict", server.http, str(inputs)]) == 1  # three models: which one?
    assert "--model" in capsys.readouterr().err


# --------------------------------------------------------------------------- gRPC retries


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
        with Client(f"grpc://127.0.0.1:{port}", protocol="oip-grpc", retry=FAST) as c:
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
        "espro_client.Client('grpc://127.0.0.1:1', protocol='oip-grpc').close()\n"
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
