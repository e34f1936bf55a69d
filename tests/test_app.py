"""The Ray Serve app on loopback: three doors, one answer, batching, metrics, refusals, swaps.

Every test talks to the session's one real server (``server`` in conftest) with real clients:
``requests`` for native JSON, and ``tritonclient`` over HTTP and gRPC for the Open Inference
Protocol. gRPC goes through Serve's proxy (``grpc``) or the replica's direct door
(``direct``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from helpers import (
    FP32_ATOL,
    Gate,
    held_port,
    listeners,
    reachable_beyond_loopback,
    wait_until,
)
from serving.bundle import load_bundle
from serving.errors import STATUS_TRAILER
from serving.manifest import TENSORS_FILE
from serving.predictor import Predictor
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from serving.service import INPUT

X = (torch.randn(5, 4, generator=torch.Generator().manual_seed(3)) * 2).numpy()


def offline(server, key: str, **kwargs):
    """What ``espro predict`` answers: a Predictor on the same bundle, in this process."""
    predictor = Predictor(load_bundle(server.bundles[key]), allow_custom_architecture=True)
    return predictor.predict(torch.from_numpy(X), **kwargs)


def native(server, model: str, body, **kwargs) -> requests.Response:
    url = f"{server.http}/v1/models/{model}/predict"
    if isinstance(body, bytes | str):
        return requests.post(url, data=body, timeout=30, **kwargs)
    return requests.post(url, json=body, timeout=30, **kwargs)


def triton_http(server):
    return thttp.InferenceServerClient(server.http.removeprefix("http://"), network_timeout=30)


GRPC_DOORS = ("grpc", "direct")


def triton_grpc(server, door: str = "grpc"):
    return tgrpc.InferenceServerClient(getattr(server, door))


def http_infer(server, x=X, binary=True, model="tiny", version="", **parameters):
    inputs = [thttp.InferInput(INPUT, list(x.shape), "FP32").set_data_from_numpy(x, binary)]
    outputs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities",)]
    return triton_http(server).infer(
        model, inputs, model_version=version, outputs=outputs, parameters=parameters or None
    )


def grpc_infer(server, x=X, model="tiny", version="", door="grpc", **parameters):
    inputs = [tgrpc.InferInput(INPUT, list(x.shape), "FP32").set_data_from_numpy(x)]
    return triton_grpc(server, door).infer(
        model, inputs, model_version=version, parameters=parameters or None
    )


# --------------------------------------------------------------------------- one answer


def test_every_door_answers_as_offline_predict(server):
    expected = offline(server, "tiny/2")
    body = native(server, "tiny", {"inputs": X.tolist()}).json()
    assert body["model_name"] == "tiny" and body["model_version"] == "2"
    assert body["bundle_sha256"] == load_bundle(server.bundles["tiny/2"]).digest
    records = body["predictions"]
    np.testing.assert_allclose([r["probabilities"] for r in records], expected.probs, atol=1e-5)
    np.testing.assert_allclose([r["entropy"] for r in records], expected.entropy, atol=1e-5)
    np.testing.assert_allclose(
        [r["mutual_information"] for r in records], expected.mutual_information, atol=1e-5
    )
    assert [r["label"] for r in records] == expected.labels.tolist()
    assert [r["abstain"] for r in records] == expected.abstain.tolist()
    assert all(r["class_name"] in ("cat", "dog", "bird") for r in records)

    for binary in (True, False):
        result = http_infer(server, binary=binary)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected.probs, atol=1e-5)
    for door in GRPC_DOORS:
        result = grpc_infer(server, door=door)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected.probs, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("entropy"), expected.entropy, atol=1e-5)
        np.testing.assert_array_equal(result.as_numpy("prediction_set"), expected.prediction_sets)
        assert result.get_response().model_version == "2"


def test_versions_draws_and_members(server):
    old = offline(server, "tiny/1", draws=1, return_members=True)
    result = grpc_infer(server, version="1", draws=1, return_members=True)
    np.testing.assert_allclose(result.as_numpy("probabilities"), old.probs, atol=1e-5)
    members = result.as_numpy("member_probabilities")
    np.testing.assert_allclose(members, old.member_probs.transpose(0, 1), atol=1e-5)
    assert members.shape == (5, 2, 3)  # batch, 2 simplexes x 1 draw, classes
    body = native(server, "tiny", {"inputs": X.tolist(), "draws": 1, "return_members": True})
    assert len(body.json()["predictions"][0]["member_probabilities"]) == 2


def test_fresh_draws_for_models_without_batchnorm(server):
    stored = load_bundle(server.bundles["tiny/2"]).manifest.simplexes[0].draws
    fresh = len(stored) + 2  # the server allows 2 fresh draws per simplex
    first = native(server, "tiny", {"inputs": X.tolist(), "draws": fresh, "return_members": True})
    assert first.status_code == 200, first.text
    record = first.json()["predictions"][0]
    assert len(record["member_probabilities"]) == 2 * fresh
    again = native(server, "tiny", {"inputs": X.tolist(), "draws": fresh}).json()
    assert again["predictions"][0]["probabilities"] == pytest.approx(
        record["probabilities"], abs=FP32_ATOL
    )
    refused = native(server, "tiny", {"inputs": X.tolist(), "draws": fresh + 1})
    assert refused.status_code == 400 and "draws must be between 1 and 4" in refused.text
    bn = native(server, "tiny-bn", {"inputs": X.tolist(), "draws": 3})
    assert bn.status_code == 400 and "between 1 and 2" in bn.text


def test_tritonclient_health_and_metadata(server):
    for client in (triton_http(server), triton_grpc(server), triton_grpc(server, "direct")):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
        assert not client.is_model_ready("tiny", "9")
    metadata = triton_http(server).get_model_metadata("tiny")
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    for door in GRPC_DOORS:
        grpc_metadata = triton_grpc(server, door).get_model_metadata("tiny-bn")
        assert [o.name for o in grpc_metadata.outputs][:2] == ["probabilities", "label"]
        assert triton_grpc(server, door).get_server_metadata().extensions == ["binary_tensor_data"]
    assert triton_http(server).get_server_metadata()["name"] == "espro"
    models = requests.get(f"{server.http}/v1/models", timeout=10).json()["models"]
    assert {m["name"] for m in models} == {"tiny", "tiny-bn", "slow", "pets"}


def test_openapi_documents_the_routes(server):
    spec = requests.get(f"{server.http}/openapi.json", timeout=10).json()
    paths = spec["paths"]
    assert "/v1/models/{name}/predict" in paths
    assert "/v2/models/{name}/versions/{version}/infer" in paths
    body = paths["/v1/models/{name}/predict"]["post"]["requestBody"]
    assert "inputs" in body["content"]["application/json"]["schema"]["properties"]
    assert "$ref" not in json.dumps(body)


# --------------------------------------------------------------------------- refusals

REST_PATH = "/v2/models/tiny/infer"


def rest_body(data, shape, datatype="FP32", **parameters) -> str:
    request = {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}
    return json.dumps(request | ({"parameters": parameters} if parameters else {}))


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/models/tiny/predict", '{"inputs": [[1, 2, 3]]}', 400, "expected inputs of shape"),
        ("/v1/models/tiny/predict", '{"inputs": [["a", 2, 3, 4]]}', 400, "rectangular"),
        ("/v1/models/tiny/predict", '{"inputs": [[NaN, 2, 3, 4]]}', 400, "NaN"),
        ("/v1/models/tiny/predict", '{"inputs": []}', 422, "inputs"),
        ("/v1/models/tiny/predict", '{"inputs": [[1, 2, 3, 4]], "draws": 99}', 400, "draws"),
        ("/v1/models/tiny/predict", "{oops", 400, "not valid JSON"),
        ("/v1/models/nope/predict", '{"inputs": [[1, 2, 3, 4]]}', 404, "unknown model 'nope'"),
        (REST_PATH, rest_body([1, 2, 3], [1, 3]), 400, "expected inputs of shape"),
        (REST_PATH, rest_body(["a", "b", "c", "d"], [1, 4], "BYTES"), 400, "real numbers"),
        (REST_PATH, rest_body([], [0, 4]), 400, "empty"),
        (REST_PATH, rest_body([1, 2, 3, 4], [1, 4], draws=-1), 400, "draws"),
        ("/v2/models/tiny/versions/9/infer", rest_body([1, 2, 3, 4], [1, 4]), 404, "version"),
    ],
)
def test_http_refusals_name_the_problem(server, path, body, status, message):
    response = requests.post(server.http + path, data=body, timeout=10)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_a_body_over_the_limit_is_413_and_the_server_stays_up(server):
    huge = np.zeros((80_000, 4), np.float32)  # about 1.8 MB as JSON, over the 1 MiB limit
    response = native(server, "tiny", {"inputs": huge.tolist()})
    assert response.status_code == 413 and "limit" in response.json()["error"]
    for door in GRPC_DOORS:
        with pytest.raises(InferenceServerException) as info:
            grpc_infer(server, x=np.zeros((80_000, 4), np.float32), door=door)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert native(server, "tiny", {"inputs": X.tolist()}).status_code == 200


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"x": np.ones((2, 3), np.float32)}, "INVALID_ARGUMENT", "shape"),
        ({"x": np.full((1, 4), np.inf, np.float32)}, "INVALID_ARGUMENT", "inf"),
        ({"draws": 50}, "INVALID_ARGUMENT", "draws"),
        ({"model": "nope"}, "NOT_FOUND", "unknown model"),
        ({"model": "Ünïcode"}, "NOT_FOUND", "unknown model"),
        ({"version": "9"}, "NOT_FOUND", "no version '9'"),
        ({"x": np.zeros((0, 4), np.float32)}, "INVALID_ARGUMENT", "empty"),
    ],
)
@pytest.mark.parametrize("door", GRPC_DOORS)
def test_grpc_refusals_carry_their_code(server, door, fields, code, message):
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(server, door=door, **fields)
    assert info.value.status() == f"StatusCode.{code}"
    assert message in info.value.message()


@pytest.mark.parametrize("door", GRPC_DOORS)
def test_grpc_refusals_carry_their_http_status_in_a_trailer(server, door):
    """Serve's proxy passes on the trailer by which clients tell espro's refusals from its own."""
    request = pb.ModelMetadataRequest(name="nope")
    with (
        grpc.insecure_channel(getattr(server, door)) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        GRPCInferenceServiceStub(channel).ModelMetadata(request)
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert (STATUS_TRAILER, "404") in tuple(refused.value.trailing_metadata())


# --------------------------------------------------------------------------- batching, metrics


def scrape(server) -> dict:
    text = requests.get(server.metrics, timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def histogram_total(family, suffix: str = "_count", **labels) -> float:
    """The sum over a histogram's ``_count`` (or ``_sum``) samples that carry ``labels``."""
    return sum(
        sample.value
        for sample in family.samples
        if sample.name.endswith(suffix) and labels.items() <= sample.labels.items()
    )


def one_replica() -> int:
    """The pid of the app's one replica, once a replica a redeploy replaced has stopped (it
    would share the direct door's port and Serve's routing meanwhile)."""
    return wait_until(lambda: len(pids := replica_pids()) == 1 and pids[0], "one replica left")


def outcome(call: Callable[[], Any]) -> Any:
    """What ``call`` returns, or the exception it raises."""
    try:
        return call()
    except Exception as err:
        return err


def hold_and_burst(
    gate: Gate, first: Callable[[], Any], burst: list[Callable[[], Any]], refused: int
) -> list[Any]:
    """With ``gate`` closed, make the call ``first`` and wait until it holds the engine; then
    make the ``burst`` of calls at once and wait until ``refused`` of them are answered (no
    call can be answered but by a refusal while the engine is held). Then open the gate, and
    return the outcome of every call, ``first``'s first."""
    gate.close()
    try:
        entered = len(gate.batches())
        with ThreadPoolExecutor(1 + len(burst)) as pool:
            calls = [pool.submit(outcome, first)]
            wait_until(lambda: len(gate.batches()) > entered, "the first call to hold the engine")
            calls += [pool.submit(outcome, call) for call in burst]
            wait_until(lambda: sum(c.done() for c in calls) >= refused, f"{refused} refusals")
            gate.open()
            return [c.result() for c in calls]
    finally:
        gate.open()


def gated(server, tmp_path: Path) -> tuple[Gate, Path]:
    """A :class:`Gate` and its model ``gated``'s bundle, to add to the served bundles."""
    gate = Gate(tmp_path / "gate")
    return gate, gate.bundle(tmp_path / "gated")


def test_requests_queued_behind_a_running_batch_share_the_next_one_and_are_counted(
    server, tmp_path
):
    """One request holds the engine while 19 more arrive at the direct door, which takes 16
    calls at once: 4 are refused, so 15 wait in the replica (the door counts a call only as it
    is queued). Released, the engine runs the 15 as one batch (tests/test_batching.py checks
    the batcher's rule itself), and the metrics count 2 engine runs for 16 answers."""
    gate, bundle = gated(server, tmp_path)
    expected = Predictor(load_bundle(bundle), allow_custom_architecture=True).predict(
        torch.from_numpy(X[:1])
    )
    bundles = [*server.config.bundles, str(bundle)]
    server.redeploy(bundles=bundles, batch_wait_timeout_s=0.0, max_direct_rpcs=16)
    try:
        one_replica()
        (replica,) = [actor["name"].rsplit("#", 1)[1] for actor in serve_replicas()]
        series = {"model": "gated", "replica": replica}  # replicas of other tests served it too
        engine_runs = len(gate.batches())

        def call() -> Any:
            return grpc_infer(server, x=X[:1], model="gated", door="direct")

        outcomes = hold_and_burst(gate, call, [call] * 19, refused=4)
        assert gate.batches()[engine_runs:] == [1, 15]
        families = wait_until(lambda: counted(server, runs=2, answers=16, **series), "metrics")
    finally:
        server.redeploy()
    answers = [o for o in outcomes if not isinstance(o, Exception)]
    refusals = [o for o in outcomes if isinstance(o, Exception)]
    assert len(answers) == 16 and len(refusals) == 4, refusals
    for answer in answers:
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected.probs, atol=FP32_ATOL)
    assert all(r.status() == "StatusCode.RESOURCE_EXHAUSTED" for r in refusals)
    assert all("backpressure" in r.message() for r in refusals)

    assert histogram_total(families["ray_espro_batch_requests"], **series) == 2
    for name in ("predictive_entropy_nats", "mutual_information_nats", "confidence"):
        assert histogram_total(families[f"ray_espro_{name}"], version="1", **series) > 0
    info = families["ray_espro_model_info"]
    digests = {s.labels["bundle_sha256"] for s in info.samples if s.labels["model"] == "tiny"}
    assert {load_bundle(server.bundles[f"tiny/{v}"]).digest for v in "12"} <= digests
    engines = {
        (s.labels["version"], s.labels["batch_range"], s.labels["engine"])
        for s in families["ray_espro_engine_info"].samples
        if s.labels["model"] == "tiny"
    }
    assert {("1", "1+", "fused:graphs"), ("2", "1+", "fused:graphs")} <= engines


def counted(server, runs: int, answers: int, **labels: str) -> dict | None:
    """The metrics, once the series with ``labels`` count ``runs`` engine runs and ``answers``
    answers (200) and the model-info and engine-info gauges are there (Ray exports about once
    a second, each series on its own); else None."""
    families = scrape(server)
    batches, answered = families.get("ray_espro_batch_requests"), families.get("ray_espro_requests")
    if not (
        batches
        and answered
        and {"ray_espro_model_info", "ray_espro_engine_info"} <= families.keys()
    ):
        return None
    ok = sum(
        s.value
        for s in answered.samples
        if labels.items() <= s.labels.items() and s.labels.get("status") == "200"
    )
    done = histogram_total(batches, **labels) >= runs and ok >= answers
    return families if done else None


def test_the_direct_door_listens_on_loopback_and_counts_its_calls(server):
    port = int(server.direct.rsplit(":", 1)[1])
    assert {str(x.address) for x in listeners() if x.port == port} == {"127.0.0.1"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: grpc_infer(server, door="direct"), range(8)))
    assert all(a.as_numpy("probabilities").shape == (5, 3) for a in answers)
    deadline = time.monotonic() + 30
    while True:
        answered = scrape(server).get("ray_espro_requests")
        samples = answered.samples if answered else []
        direct = [s for s in samples if s.labels.get("door") == "grpc-direct"]
        if sum(s.value for s in direct if s.labels["status"] == "200") >= 8:
            break
        assert time.monotonic() < deadline, f"no grpc-direct requests counted: {samples}"
        time.sleep(1)
    # "gated": the held model of test_requests_queued_behind_a_running_batch_share_the_next_one
    assert {s.labels["model"] for s in direct} <= {"tiny", "gated", "unknown"}


def test_the_direct_http_door_answers_as_serves_and_counts_its_requests(server):
    port = int(server.direct_http.rsplit(":", 1)[1])
    assert {str(x.address) for x in listeners() if x.port == port} == {"127.0.0.1"}
    body = {"inputs": X.tolist()}
    direct = requests.post(f"{server.direct_http}/v1/models/tiny/predict", json=body, timeout=30)
    served = native(server, "tiny", body)
    assert direct.status_code == served.status_code == 200
    pairs = zip(direct.json()["predictions"], served.json()["predictions"], strict=True)
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours["probabilities"], theirs["probabilities"], atol=FP32_ATOL)
    oip = thttp.InferenceServerClient(server.direct_http.removeprefix("http://"))
    inputs = [thttp.InferInput(INPUT, list(X.shape), "FP32")]
    inputs[0].set_data_from_numpy(X, binary_data=True)
    answer = oip.infer("tiny", inputs).as_numpy("probabilities")
    np.testing.assert_allclose(answer, offline(server, "tiny/2").probs, atol=FP32_ATOL)
    unknown = requests.post(f"{server.direct_http}/v1/models/nope/predict", json=body, timeout=30)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    # The model routes are answered past FastAPI's router; the rest go through it, as in Serve.
    oip_json = {"inputs": [{"name": INPUT, "shape": list(X.shape), "datatype": "FP32"}]}
    oip_json["inputs"][0]["data"] = X.ravel().tolist()
    for path in ("/v2/models/tiny/versions/1/infer", "/v2/models/tiny/infer"):
        direct, served = (
            requests.post(f"{base}{path}", json=oip_json, timeout=30)
            for base in (server.direct_http, server.http)
        )
        assert direct.status_code == served.status_code == 200
        assert direct.json()["model_version"] == served.json()["model_version"]
    bad = {"inputs": [{"name": INPUT, "shape": [5, 3], "datatype": "FP32", "data": [0.0] * 15}]}
    direct, served = (
        requests.post(f"{base}/v2/models/tiny/infer", json=bad, timeout=30)
        for base in (server.direct_http, server.http)
    )
    assert direct.status_code == served.status_code == 400
    assert direct.json() == served.json()
    for method, path in (("GET", "/v2/models/tiny/infer"), ("POST", "/v2/models/tiny")):
        direct, served = (
            requests.request(method, f"{base}{path}", timeout=30)
            for base in (server.direct_http, server.http)
        )
        assert direct.status_code == served.status_code == 405
    for door in ("native-direct", "rest-direct"):
        wait_until(
            lambda door=door: any(
                s.labels.get("door") == door and s.labels["status"] == "200" and s.value >= 1
                for s in getattr(scrape(server).get("ray_espro_requests"), "samples", [])
            ),
            f"a {door} request counted",
        )


def test_no_door_or_ray_process_listens_beyond_loopback(server):
    """Serve's doors, the direct door, each replica's internal gRPC server and Ray's own
    ports all bind loopback, though the namespace has a second address (conftest)."""
    found = listeners()
    assert {18000, 19000, 19050, 19051} <= {x.port for x in found}
    assert any("ServeReplica" in x.command for x in found), found
    assert reachable_beyond_loopback() == []


def test_a_replica_runs_no_internal_call_without_the_ray_token(server):
    """Each replica's internal gRPC server unpickles what it is sent; without Ray's token
    (espro turns Ray's token authentication on) it refuses before reading the message. The
    replica's other port, Ray's core worker, knows no such method."""
    direct = {int(door.rsplit(":", 1)[1]) for door in (server.direct, server.direct_http)}
    codes = {}
    for listener in listeners():
        if "ServeReplica" in listener.command and listener.port not in direct:
            with grpc.insecure_channel(f"127.0.0.1:{listener.port}") as channel:
                call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
                with pytest.raises(grpc.RpcError) as refused:
                    call(b"", timeout=10)
            codes[listener.port] = refused.value.code()
    assert grpc.StatusCode.UNAUTHENTICATED in codes.values(), codes
    assert set(codes.values()) <= {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }, codes


def test_the_ray_token_is_in_no_file_or_log(server):
    """The token made for a local Ray lives in its processes' environment only."""
    token = os.environ["RAY_AUTH_TOKEN"].encode()
    assert len(token) >= 32
    files = [*Path("/tmp/ray").rglob("*"), *Path.home().joinpath(".ray").rglob("*")]
    leaks = [f for f in files if f.is_file() and not f.is_symlink() and token in f.read_bytes()]
    assert leaks == []


def replica_pids() -> list[int]:
    """The replica processes of this test session: those in its network namespace (other
    test sessions on the machine share the process table, not the namespace)."""
    here = os.readlink("/proc/self/ns/net")
    return [
        int(proc.name)
        for proc in Path("/proc").glob("[0-9]*")
        if b"ServeReplica:espro" in _read(proc / "cmdline") and _netns(proc) == here
    ]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process exited
        return b""


def _netns(proc: Path) -> str | None:
    try:
        return os.readlink(proc / "ns" / "net")
    except OSError:  # the process exited
        return None


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS since the last reset) of a process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M)[1])


def own_memory_kib(pid: int, field: str) -> int:
    """``field`` less the pages of Ray's object store the process maps (``RssShmem``): those
    belong to the store, which is shared, bounded by its configured size and reused."""
    return memory_kib(pid, field) - memory_kib(pid, "RssShmem")


def test_a_hostile_json_body_costs_the_replica_little_and_other_doors_answer(server):
    """16 MiB of nested empty lists over native JSON: the replica refuses it with 400, its own
    memory grows by less than 4x the body at its peak, and gRPC requests sent meanwhile are
    answered (a parser that built a Python list per "[]" grew the replica by 86x the body and
    stalled every door for seconds; how long such a body takes to decode is measured by
    benchmarks/request_decode.py). Serve hands the body over through Ray's object store
    (pickled chunks, then unpickled): that costs about 1x the body in the store's shared pages,
    and about 2x in the replica, before espro reads a byte."""
    server.redeploy(max_body_bytes=32 << 20)
    try:
        pid = one_replica()
        grpc_infer(server)  # warm
        url = f"{server.http}/v1/models/tiny/predict"
        body = b'{"inputs": [' + b",".join([b"[[]]"] * ((16 << 20) // 5)) + b"]}"
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = own_memory_kib(pid, "VmRSS")
        with ThreadPoolExecutor(1) as pool:
            hostile = pool.submit(requests.post, url, data=body, timeout=60)
            while not hostile.done():
                assert grpc_infer(server).as_numpy("probabilities").shape == (5, 3)
        answer = hostile.result()
        grown = (own_memory_kib(pid, "VmHWM") - before) * 1024 / len(body)
    finally:
        server.redeploy()
    assert answer.status_code == 400 and "nested deeper" in answer.json()["error"]
    assert grown < 4, f"the replica grew by {grown:.1f}x the body"


# --------------------------------------------------------------------------- overload, swaps


def test_a_full_queue_answers_503_with_retry_after(server, tmp_path):
    """A replica that holds one request and a proxy that queues one: while the engine is held,
    further HTTP requests get 503 with Retry-After, and over gRPC Serve's RESOURCE_EXHAUSTED
    "backpressure", which espro_client retries like UNAVAILABLE (not here: one attempt).
    Released, the admitted requests are answered. Serve's router may admit a request beyond
    its bounds while it assigns another, so the test counts refusals from a lower bound."""
    from espro_client import Client, Retry, Unavailable

    gate, bundle = gated(server, tmp_path)
    body = {"inputs": [[1, 2, 3, 4]]}

    def http() -> requests.Response:
        return native(server, "gated", body)

    def oip_grpc() -> str:
        with Client(server.grpc, protocol="oip-grpc", retry=Retry(attempts=1)) as client:
            try:
                client.predict("gated", body["inputs"])
            except Unavailable as err:
                return f"{err.status}: {err.message}"
        return "OK"

    bundles = [*server.config.bundles, str(bundle)]
    server.redeploy(
        bundles=bundles, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1
    )
    try:
        one_replica()
        answers = hold_and_burst(gate, http, [http] * 9, refused=5)
        outcomes = hold_and_burst(gate, http, [oip_grpc] * 6, refused=3)
    finally:
        server.redeploy()
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 503} and codes[0] == 200, codes
    assert codes.count(200) >= 2 and codes.count(503) >= 5, codes  # one held, one queued
    assert all(a.headers["Retry-After"] == "1" for a in answers if a.status_code == 503)
    assert outcomes[0].status_code == 200
    refusals = [o for o in outcomes[1:] if o != "OK"]
    assert "OK" in outcomes[1:] and len(refusals) >= 3, outcomes
    assert all(o.startswith("RESOURCE_EXHAUSTED: Request dropped") for o in refusals), refusals
    assert native(server, "tiny", {"inputs": X.tolist()}).status_code == 200


@pytest.mark.parametrize("timeout", ["0.001", "0", "-1"])
def test_a_client_header_does_not_change_the_doors_timeout(server, timeout):
    """The doors bound every request (``LaunchConfig.request_timeout_s``). Serve's proxy
    would take ``x-request-timeout-seconds`` from the client instead (0 or less: no bound);
    espro strips it, so a timeout the header shortens to 1 ms still answers 200."""
    from ray.serve.context import _get_global_client

    http_options = _get_global_client().get_serve_details()["http_options"]
    assert http_options["request_timeout_s"] == 20
    headers = {"X-Request-Timeout-Seconds": timeout, "x-request-disconnect-disabled": "?1"}
    answer = native(server, "slow", {"inputs": X.tolist()}, headers=headers)
    assert answer.status_code == 200, answer.text


def test_a_new_version_replaces_the_old_under_load(server, tmp_path):
    from helpers import tiny_bundle

    v3 = tiny_bundle(seed=5, version="3").write(tmp_path / "tiny-3")
    answers: list[requests.Response] = []
    stop = time.monotonic() + 60

    def hammer() -> None:
        while time.monotonic() < stop:
            answers.append(answer := native(server, "tiny", {"inputs": X.tolist()}))
            if answer.status_code != 200 or answer.json()["model_version"] == "3":
                return

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(hammer) for _ in range(4)]
        wait_until(
            lambda: any(
                a.status_code == 200 and a.json()["model_version"] == "2" for a in answers[:]
            ),
            "an answer of the old version",
        )
        server.redeploy(bundles=[*server.config.bundles, str(v3)])
        for future in running:
            future.result()
    try:
        assert all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
        versions = [a.json()["model_version"] for a in answers]
        assert "2" in versions and "3" in versions
        expected = Predictor(load_bundle(v3)).predict(torch.from_numpy(X)).probs
        newest = next(a for a in answers if a.json()["model_version"] == "3")
        got = [r["probabilities"] for r in newest.json()["predictions"]]
        np.testing.assert_allclose(got, expected, atol=1e-5)
    finally:
        server.redeploy()


# --------------------------------------------------------------------------- espro serve


def test_espro_serve_starts_answers_and_drains_on_sigterm(server, tmp_path):
    """The command line end to end, as its own process with its own Ray cluster: a request
    that holds the engine when SIGTERM arrives is still answered once the server drains."""
    gate, bundle = gated(server, tmp_path)
    bundles = [str(server.bundles["tiny/1"]), str(bundle)]
    command = [sys.executable, "-m", "serving.cli", "serve", *bundles, "--ray-cpus", "1"]
    command += ["--engine", "fused"]  # auto's ONNX export would trace the gate away
    command += ["--http-port", "18100", "--grpc-port", "19100", "--metrics-port", "18180"]
    command += ["--allow-custom-architecture"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = "http://127.0.0.1:18100/v1/models/{}/predict"
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops it" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        answer = requests.post(url.format("tiny"), json={"inputs": X.tolist()}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
        assert tgrpc.InferenceServerClient("127.0.0.1:19100").is_model_ready("tiny")
        assert reachable_beyond_loopback() == []  # its own Ray's processes included
        gate.close()
        entered = len(gate.batches())
        with ThreadPoolExecutor(1) as pool:
            body = {"inputs": [[1, 2, 3, 4]]}
            in_flight = pool.submit(requests.post, url.format("gated"), json=body, timeout=60)
            wait_until(lambda: len(gate.batches()) > entered, "the request to hold the engine")
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining" in log.read_text(), "espro serve to drain")
            gate.open()
            assert in_flight.result().status_code == 200
    finally:
        gate.open()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    assert "draining" in log.read_text()


def test_espro_serve_beyond_loopback_relays_metrics_and_keeps_ray_on_loopback(server, tmp_path):
    """``--host 0.0.0.0``: the doors and the metrics port listen on every interface, the
    metrics through the relay in the ``espro serve`` process, while Ray's own ports, its
    exporter among them, stay on loopback. (Only the listening sockets are inspected: no
    traffic goes to the namespace's second address.)"""
    command = [sys.executable, "-m", "serving.cli", "serve", str(server.bundles["tiny/1"])]
    command += ["--host", "0.0.0.0", "--ray-cpus", "1", "--allow-custom-architecture"]
    command += ["--http-port", "18500", "--grpc-port", "19500", "--metrics-port", "18580"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: process.poll() is not None or "Ctrl-C stops it" in log.read_text(),
            "espro serve to start",
            timeout_s=120,
        )
        assert process.poll() is None, log.read_text()
        assert "metrics  http://0.0.0.0:18580/metrics" in log.read_text()
        beyond = {x.port: x for x in reachable_beyond_loopback()}
        assert {18500, 19500, 18580} <= set(beyond)
        assert beyond[18580].command == " ".join(command)  # the relay
        # Beyond the doors and the relay, only the replicas' internal gRPC servers (bound
        # to --host, behind Ray's token): none of Ray's own ports.
        others = [x for x in beyond.values() if x.port not in {18500, 19500, 18580}]
        assert all("ServeReplica" in x.command for x in others), others
        answer = requests.post(
            "http://127.0.0.1:18500/v1/models/tiny/predict", json={"inputs": X.tolist()}
        )
        assert answer.status_code == 200
        metrics = "http://127.0.0.1:18580/metrics"
        wait_until(lambda: "ray_serve_" in requests.get(metrics).text, "Serve's metrics")
        assert requests.get("http://127.0.0.1:18580/").status_code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    assert reachable_beyond_loopback() == []  # the relay closed with the rest


def test_espro_serve_stopped_while_it_deploys_still_exits_cleanly(server, tmp_path):
    """SIGTERM while the application deploys (its replica's warm-up held by a gate): Ray's own
    SIGTERM handlers would end the process mid-deploy (exit -6); espro's let the deploy
    finish, then everything drains and stops."""
    gate, bundle = gated(server, tmp_path)
    command = [sys.executable, "-m", "serving.cli", "serve", str(bundle), "--engine", "fused"]
    command += ["--ray-cpus", "1", "--http-port", "18200", "--grpc-port", "19200"]
    command += ["--metrics-port", "18280", "--allow-custom-architecture"]
    log = tmp_path / "serve.log"
    gate.close()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: (
                process.poll() is not None
                or ("Started Serve" in log.read_text() and gate.batches())
            ),
            "the replica's warm-up to hold the deploy",
            timeout_s=120,
        )
        assert process.poll() is None, log.read_text()
        assert "Ctrl-C stops it" not in log.read_text()  # still deploying
        process.send_signal(signal.SIGTERM)
        gate.open()
        assert process.wait(timeout=120) == 0, log.read_text()
    finally:
        gate.open()
        if process.poll() is None:
            process.kill()
    assert "draining" in log.read_text()


def test_espro_serve_names_why_its_replicas_did_not_start(server):
    """A direct-door port another program holds: the replicas cannot start, and ``espro
    serve`` says why in one line and exits, instead of a traceback of Serve's."""
    with held_port() as port:
        command = [sys.executable, "-m", "serving.cli", "serve", str(server.bundles["tiny/1"])]
        command += ["--ray-cpus", "1", "--http-port", "18300", "--grpc-port", "19300"]
        command += ["--metrics-port", "18380", "--direct-grpc-port", str(port)]
        command += ["--allow-custom-architecture"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"cannot listen on 127.0.0.1:{port}" in error
    assert "Traceback" not in result.stderr


def test_espro_serve_refuses_a_missing_bundle_before_starting_ray(tmp_path):
    command = [sys.executable, "-m", "serving.cli", "serve", str(tmp_path / "nothing")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "error:" in result.stderr and "nothing" in result.stderr


def test_espro_serve_refuses_corrupt_weights_found_while_ray_starts(server, tmp_path):
    """The weights are verified in a thread while Ray starts: a corrupt bundle is still one
    clear line and exit code 2."""
    bundle = shutil.copytree(server.bundles["tiny/1"], tmp_path / "tiny")
    weights = bundle / TENSORS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    command = [sys.executable, "-m", "serving.cli", "serve", str(bundle), "--ray-cpus", "1"]
    command += ["--http-port", "18400", "--grpc-port", "19400", "--metrics-port", "18480"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"sha256 mismatch for {TENSORS_FILE}" in error
    assert "Started a local Ray instance" in result.stderr  # found after Ray started
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- access


def test_bearer_tokens_guard_http_and_grpc_but_not_health(server, tmp_path):
    from espro_client import Client, Unauthorized
    from espro_client.cli import main as client_cli

    token = "tok-" + "7" * 24
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{token}\n")
    server.redeploy(auth_token_file=str(token_file))
    try:
        body = {"inputs": X.tolist()}
        refused = native(server, "tiny", body)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert "Bearer" in refused.json()["error"] and token not in refused.text
        wrong = native(server, "tiny", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = native(server, "tiny", body, headers={"Authorization": f"Bearer {token}"})
        assert good.status_code == 200
        assert requests.get(f"{server.http}/v2/models/tiny", timeout=10).status_code == 401
        assert requests.get(f"{server.http}/v2/health/ready", timeout=10).status_code == 200

        client = triton_grpc(server)
        assert client.is_server_live()  # health stays open for probes
        for door in GRPC_DOORS:
            with pytest.raises(InferenceServerException) as info:
                grpc_infer(server, door=door)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        inputs = [tgrpc.InferInput(INPUT, list(X.shape), "FP32").set_data_from_numpy(X)]
        result = client.infer("tiny", inputs, headers={"authorization": f"Bearer {token}"})
        assert result.as_numpy("probabilities").shape == (5, 3)

        doors = [(server.http, "native"), (server.http, "oip-rest"), (server.grpc, "oip-grpc")]
        direct = [(server.direct, "oip-grpc"), (server.direct_http, "native")]
        for url, protocol in [*doors, *direct, (server.direct_http, "oip-rest")]:
            with Client(url, protocol=protocol, token=token) as espro:
                assert espro.predict("tiny", X).probabilities.shape == (5, 3)
            wrong = Client(url, protocol=protocol, token="nope")
            with wrong, pytest.raises(Unauthorized, match="not valid"):
                wrong.predict("tiny", X)
        assert client_cli(["models", server.http, "--token-file", str(token_file)]) == 0
        assert client_cli(["models", server.http]) == 1
    finally:
        server.redeploy()
    assert native(server, "tiny", body).status_code == 200


def test_a_corrupt_new_bundle_is_refused_and_the_old_keeps_serving(server, tmp_path):
    from helpers import tiny_bundle
    from serving.errors import BundleError

    corrupt = tiny_bundle(seed=7, version="4").write(tmp_path / "tiny-4")
    weights = corrupt / "vertices.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight: the hash no longer matches
    weights.write_bytes(bytes(data))
    answers: list[requests.Response] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            answers.append(native(server, "tiny", {"inputs": X.tolist()}))

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(hammer) for _ in range(2)]
        wait_until(lambda: len(answers) >= 2, "answers before the deploy")
        with pytest.raises(BundleError, match="sha256"):
            server.redeploy(bundles=[*server.config.bundles, str(corrupt)])
        refused = len(answers)
        wait_until(lambda: len(answers) >= refused + 2, "answers after the refusal")
        stop.set()
        for future in running:
            future.result()
    assert answers and all(a.status_code == 200 for a in answers)
    assert {a.json()["model_version"] for a in answers} == {"2"}


def test_bad_bundles_deployed_past_espro_are_refused_by_the_replica(server, tmp_path):
    """``serve deploy`` of a config naming a corrupt bundle and one whose network fails to run
    skips espro's check: the replica refuses both (the second at its warm-up), serves the
    others (no outage) and counts them in a gauge."""
    from ray import serve

    from helpers import tiny_bundle
    from serving.app import build_app
    from serving.launch import APP_NAME
    from serving.manifest import ArchitectureSpec

    corrupt = tiny_bundle(seed=7, version="4").write(tmp_path / "tiny-4")
    weights = corrupt / "vertices.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    broken = tiny_bundle(
        slow=True, name="broken", architecture=ArchitectureSpec(name="helpers:broken_linear")
    ).write(tmp_path / "broken")
    answers: list[requests.Response] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            answers.append(native(server, "tiny", {"inputs": X.tolist()}))

    bad = [str(corrupt), str(broken)]
    config = server.config.model_copy(update={"bundles": [*server.config.bundles, *bad]})
    try:
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(hammer) for _ in range(2)]
            wait_until(lambda: len(answers) >= 2, "answers before the deploy")
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")  # as serve deploy
            deployed = len(answers)
            wait_until(lambda: len(answers) >= deployed + 2, "answers after the deploy")
            stop.set()
            for future in running:
                future.result()
        versions = requests.get(f"{server.http}/v1/models", timeout=10).json()["models"]
        deadline = time.monotonic() + 30
        while not (refused := scrape(server).get("ray_espro_bundles_refused")) or not any(
            sample.value == 2 for sample in refused.samples
        ):
            assert time.monotonic() < deadline, "the refused bundles never showed in the gauge"
            time.sleep(1)
    finally:
        server.redeploy()
    assert answers and all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    assert {a.json()["model_version"] for a in answers} == {"2"}
    tiny = next(model for model in versions if model["name"] == "tiny")
    assert [v["version"] for v in tiny["versions"]] == ["1", "2"]
    assert "broken" not in {model["name"] for model in versions}


def serve_replicas() -> list[dict]:
    import ray

    return [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA::espro#espro" in actor["name"]
    ]


def test_killing_a_replica_under_load_answers_every_request(server):
    """Serve replaces a killed replica. Plain HTTP callers get an answer to every request: the
    few in flight on the dead replica get 500 from Serve's proxy (or, if one is lost in Serve,
    408 at the doors' timeout). espro_client callers on every protocol retry those and their
    own timeouts, and every prediction succeeds. Both replicas share the direct door's port,
    and the survivor answers its callers once the other is gone."""
    import ray
    from espro_client import Client, Retry

    server.redeploy(num_replicas=2, num_cpus=0.5)
    codes: list[int] = []
    predicted: list[tuple[str, str, str]] = []
    stop = threading.Event()

    def plain() -> None:
        while not stop.is_set():
            codes.append(native(server, "tiny", {"inputs": X.tolist()}).status_code)

    def with_client(url: str, protocol: str) -> None:
        retry = Retry(attempts=6, backoff=0.1)
        with Client(url, protocol=protocol, timeout=5, retry=retry) as client:
            while not stop.is_set():
                predicted.append((url, protocol, client.predict("tiny", X).model_version))

    callers = [
        (server.http, "native"),
        (server.http, "oip-rest"),
        (server.grpc, "oip-grpc"),
        (server.direct, "oip-grpc"),
    ]

    try:
        deadline = time.monotonic() + 60
        while len(replicas := serve_replicas()) != 2:  # the old replica may still be draining
            assert time.monotonic() < deadline, replicas
            time.sleep(0.5)
        victim = replicas[0]
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(plain) for _ in range(2)]
            running += [pool.submit(with_client, url, protocol) for url, protocol in callers]
            wait_until(
                lambda: len(codes) >= 2 and {(u, p) for u, p, _ in predicted[:]} == set(callers),
                "every caller's first answer",
            )
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            deadline = time.monotonic() + 60
            while victim in (survivors := serve_replicas()) or len(survivors) < 2:
                assert time.monotonic() < deadline, "Serve did not replace the killed replica"
                time.sleep(0.5)
            stop.set()
            for future in running:
                future.result()  # a client thread that ran out of retries raises here
        after = [native(server, "tiny", {"inputs": X.tolist()}).status_code for _ in range(4)]
    finally:
        server.redeploy()
    # At most one 500 per plain thread (its request on the killed replica) and one 408 (a
    # request Serve lost around the kill, answered at the doors' timeout).
    assert set(codes) <= {200, 408, 500} and len(codes) - codes.count(200) <= 4, codes
    assert after == [200] * 4  # the replacement serves
    assert set(predicted) == {(url, protocol, "2") for url, protocol in callers}


def test_the_reference_engine_serves_the_same_answers(server):
    assert server.config.engine == "fused:graphs"  # the fixture's, used by every other test
    server.redeploy(engine="reference")  # a new replica replaces the old one
    try:
        body = native(server, "tiny", {"inputs": X.tolist()}).json()
        direct = grpc_infer(server, door="direct").as_numpy("probabilities")
    finally:
        server.redeploy()
    probs = [r["probabilities"] for r in body["predictions"]]
    np.testing.assert_allclose(probs, offline(server, "tiny/2").probs, atol=1e-5)
    np.testing.assert_allclose(direct, offline(server, "tiny/2").probs, atol=1e-5)
