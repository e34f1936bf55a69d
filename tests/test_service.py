"""The three doors answer alike: native JSON, OIP REST (JSON and binary) and OIP gRPC, with
requests and responses encoded and decoded by the real tritonclient libraries."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request as triton_grpc_request

from helpers import FP32_ATOL
from serving.bundle import load_bundle
from serving.errors import BundleError, ServiceError
from serving.manifest import Manifest
from serving.predictor import Prediction, Predictor
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.service import (
    CLASSIFICATION_OUTPUTS,
    INPUT,
    BatchObserver,
    InferenceService,
    Job,
    ModelRepository,
    model_metadata,
)

X = (torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 2).numpy()


def assert_same_answer(got: object, want: object) -> None:
    """Two decoded JSON answers agree: numbers to :data:`FP32_ATOL`, everything else exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_same_answer(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_answer(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=FP32_ATOL)
    else:
        assert got == want


@pytest.fixture
def service(tmp_path, make_tiny_bundle) -> InferenceService:
    predictors = [
        Predictor(load_bundle(make_tiny_bundle(seed=seed, version=v).write(tmp_path / v)))
        for seed, v in [(0, "1"), (1, "2")]
    ]
    return InferenceService(ModelRepository(predictors))


def expected(service: InferenceService, version: str = "2", **kwargs):
    return service.repository.get("tiny", version).predict(torch.from_numpy(X), **kwargs)


def rest(service, binary: bool, outputs=(), version=None, **parameters):
    inputs = [thttp.InferInput(INPUT, list(X.shape), "FP32").set_data_from_numpy(X, binary)]
    requested = [thttp.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    body, length = thttp.InferenceServerClient.generate_request_body(
        inputs, requested or None, request_id="r1", parameters=parameters or None
    )
    out, out_length = service.rest_infer("tiny", version, body, length)
    return thttp.InferResult.from_response_body(out, header_length=out_length)


def grpc(service, outputs=(), version="", **parameters):
    inputs = [tgrpc.InferInput(INPUT, list(X.shape), "FP32").set_data_from_numpy(X)]
    requested = [tgrpc.InferRequestedOutput(name) for name in outputs] or None
    theirs = triton_grpc_request(
        "tiny", inputs, version, "r1", requested, 0, False, False, 0, None, parameters or None
    )
    ours = service.grpc_infer(pb.ModelInferRequest.FromString(theirs.SerializeToString()))
    return tgrpc.InferResult(triton_pb.ModelInferResponse.FromString(ours.SerializeToString()))


def test_native_json_matches_the_predictor(service):
    body = json.dumps({"inputs": X.tolist(), "return_members": True})
    response = json.loads(service.native("tiny", body))
    want = expected(service, return_members=True)
    assert response["model_version"] == "2"
    got = np.array([p["probabilities"] for p in response["predictions"]])
    np.testing.assert_allclose(got, want.probs.numpy(), atol=FP32_ATOL)
    np.testing.assert_allclose(
        [p["mutual_information"] for p in response["predictions"]],
        want.mutual_information.numpy(),
        atol=FP32_ATOL,
    )
    assert len(response["predictions"][0]["member_probabilities"]) == 4


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_oip_rest_matches_the_predictor(service, binary):
    result = rest(service, binary)
    want = expected(service)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want.probs.numpy(), atol=FP32_ATOL)
    np.testing.assert_array_equal(result.as_numpy("label"), want.labels.numpy())
    np.testing.assert_allclose(result.as_numpy("entropy"), want.entropy.numpy(), atol=FP32_ATOL)
    np.testing.assert_array_equal(result.as_numpy("prediction_set"), want.prediction_sets)
    np.testing.assert_array_equal(result.as_numpy("abstain"), want.abstain.numpy())
    assert result.get_response()["model_version"] == "2"


def test_oip_grpc_matches_the_predictor(service):
    result = grpc(service)
    want = expected(service)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want.probs.numpy(), atol=FP32_ATOL)
    np.testing.assert_allclose(
        result.as_numpy("mutual_information"), want.mutual_information.numpy(), atol=FP32_ATOL
    )
    np.testing.assert_array_equal(result.as_numpy("prediction_set"), want.prediction_sets)


def test_every_door_honours_draws_members_and_versions(service):
    want = expected(service, version="1", draws=1, return_members=True)
    by_rest = rest(service, True, version="1", draws=1, return_members=True)
    by_grpc = grpc(service, version="1", draws=1, return_members=True)
    for result in (by_rest, by_grpc):
        members = result.as_numpy("member_probabilities")
        assert members.shape == (6, 2, 3)  # [batch, members, classes]: one draw per simplex
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), want.probs.numpy(), atol=FP32_ATOL
        )


def test_requested_outputs_only(service):
    result = rest(service, True, outputs=["label", "confidence"])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "confidence"]
    assert grpc(service, outputs=["entropy"]).as_numpy("label") is None


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda s: s.native("nope", b'{"inputs": [[1, 2, 3, 4]]}'), 404, "unknown model 'nope'"),
        (lambda s: s.native("tiny", b"{not json"), 400, "not valid JSON"),
        (lambda s: s.native("tiny", b'{"inputs": [[1, 2]]}'), 400, "expected inputs of shape"),
        (lambda s: s.native("tiny", b'{"inputs": [[1, 2], [3]]}'), 400, "rectangular"),
        (lambda s: s.native("tiny", b'{"inputs": [], "draws": 1}'), 422, "inputs"),
        (lambda s: s.native("tiny", b'{"inputs": [[1, 2, 3, 4]], "draws": 9}'), 400, "draws"),
        (lambda s: s.native("tiny", b'{"inputs": [[NaN, 2, 3, 4]]}'), 400, "NaN"),
        (lambda s: s.native("tiny", b'{"inputs": [[1e39, 2, 3, 4]]}'), 400, "float32's range"),
        (
            lambda s: s.rest_infer(
                "tiny",
                None,
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "input",
                                "shape": [1, 4],
                                "datatype": "FP64",
                                "data": [1, 2, 3, -1e300],
                            }
                        ]
                    }
                ).encode(),
                None,
            ),
            400,
            "float32's range",
        ),
        (lambda s: s.rest_infer("tiny", "7", b'{"inputs": []}', None), 404, "no version '7'"),
        (
            lambda s: s.rest_infer(
                "tiny",
                None,
                json.dumps(
                    {
                        "inputs": [
                            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                        ]
                    }
                ).encode(),
                None,
            ),
            400,
            "exactly one input named 'input'",
        ),
    ],
)
def test_bad_requests_are_refused_with_a_status_and_a_message(service, call, status, message):
    with pytest.raises(ServiceError) as err:
        call(service)
    assert err.value.status == status
    assert message in err.value.message


def test_metadata_describes_inputs_outputs_and_versions(service):
    metadata = model_metadata(service.repository, "tiny", None)
    assert metadata.versions == ["1", "2"]
    assert [(t.name, t.shape) for t in metadata.inputs] == [(INPUT, [-1, 4])]
    assert [t.name for t in metadata.outputs] == list(CLASSIFICATION_OUTPUTS)
    assert metadata.outputs[0].shape == [-1, 3] and metadata.outputs[1].shape == [-1]
    assert service.server_metadata().extensions == ["binary_tensor_data"]
    with pytest.raises(ServiceError, match="unknown model"):
        model_metadata(service.repository, "nope", None)


def test_jobs_batched_together_answer_as_alone(service):
    """What the server's batcher does: concatenate jobs that share a key, run the engine once,
    pool once, and hand each job its part; only the job that asked gets member outputs."""
    parts = [(0, 1, False), (1, 3, True), (4, 2, False)]
    bodies = [
        json.dumps({"inputs": X[i : i + n].tolist(), "return_members": members})
        for i, n, members in parts
    ]
    jobs = [service.native_job("tiny", body) for body in bodies]
    assert len({job.batch_key for job in jobs}) == 1
    outputs = jobs[0].member_outputs(torch.cat([job.inputs for job in jobs]))
    predictions = Job.predictions(jobs, outputs)
    for job, prediction in zip(jobs, predictions, strict=True):
        assert_same_answer(json.loads(job.encode(prediction)), json.loads(job.run()))
    assert [p.member_probs is not None for p in predictions] == [False, True, False]
    other = service.native_job("tiny", json.dumps({"inputs": X.tolist(), "draws": 1}))
    assert other.batch_key != jobs[0].batch_key  # other members: another engine run


def test_inputs_that_overflow_the_network_are_refused_not_answered_nan(service):
    """Finite inputs near float32's limit drive the members' outputs past it: the job is
    refused with a 400 naming the instance, and a job batched with it still gets its answer."""
    huge = [[3e38, 3e38, -3e38, 3e38]]
    for body in ({"inputs": X[:1].tolist() + huge}, {"inputs": huge, "return_members": True}):
        with pytest.raises(ServiceError, match=r"instance \d+ .* not finite") as refused:
            service.native("tiny", json.dumps(body))
        assert refused.value.status == 400
    good, bad = (service.native_job("tiny", json.dumps({"inputs": x})) for x in (X.tolist(), huge))
    outputs = good.member_outputs(torch.cat([good.inputs, bad.inputs]))
    answered, refused = Job.predictions([good, bad], outputs)
    assert isinstance(refused, ServiceError) and "instance 0" in refused.message
    assert_same_answer(json.loads(good.encode(answered)), json.loads(good.run()))


# -- batched answers: what the server's replica runs ------------------------------------------


class Recorder(BatchObserver):
    """Records what the service reports, as the server's metrics would."""

    def __init__(self) -> None:
        self.waits: list[str] = []
        self.batches: list[tuple[str, int, int]] = []
        self.answered: list[int] = []

    def waited(self, model: str, seconds: float) -> None:
        assert seconds >= 0
        self.waits.append(model)

    def batch(self, model: str, instances: int, requests: int, seconds: float) -> None:
        self.batches.append((model, instances, requests))

    def prediction(self, manifest: Manifest, prediction: Prediction) -> None:
        self.answered.append(len(prediction.probs))


@pytest.fixture
def engine_runs(monkeypatch) -> list[int]:
    """The members of each engine run, as a count per run; a run of one member fails."""
    runs: list[int] = []
    member_outputs = Job.member_outputs

    def counted(job: Job, inputs: torch.Tensor) -> torch.Tensor:
        runs.append(len(job.members))
        if len(job.members) == 2:
            raise RuntimeError("the engine failed")
        return member_outputs(job, inputs)

    monkeypatch.setattr(Job, "member_outputs", counted)
    return runs


def submit_all(service: InferenceService, bodies: list[dict]) -> list[object]:
    """Submit a native job per body at once; each one's answer or exception."""

    async def submit() -> list[object]:
        jobs = [service.native_job("tiny", json.dumps(body)) for body in bodies]
        answers = (service.submit(job) for job in jobs)
        return await asyncio.gather(*answers, return_exceptions=True)

    service.configure_batching(max_batch_size=32, batch_wait_timeout_s=0.05)
    return asyncio.run(asyncio.wait_for(submit(), timeout=10))


def test_concurrent_jobs_that_share_members_share_one_engine_run(service, engine_runs):
    service.observer = recorder = Recorder()
    bodies = [{"inputs": X[i : i + 2].tolist()} for i in (0, 2, 4)]
    answers = submit_all(service, bodies)
    assert engine_runs == [4]
    assert recorder.waits == ["tiny"] * 3
    assert recorder.batches == [("tiny", 6, 3)]
    assert recorder.answered == [2, 2, 2]
    for body, answer in zip(bodies, answers, strict=True):
        assert_same_answer(json.loads(answer), json.loads(service.native("tiny", json.dumps(body))))


def test_an_engine_error_reaches_every_job_of_its_group_and_no_other(service, engine_runs):
    service.observer = recorder = Recorder()
    bodies = [{"inputs": X[:2].tolist(), "draws": 1}, {"inputs": X[:2].tolist()}] * 2
    failed, answered, *_ = answers = submit_all(service, bodies)
    assert sorted(engine_runs) == [2, 4]
    assert isinstance(failed, RuntimeError) and answers[2] is failed
    assert isinstance(answered, bytes) and isinstance(answers[3], bytes)
    assert recorder.batches == [("tiny", 4, 2)] and recorder.answered == [2, 2]


def test_a_non_finite_prediction_is_refused_for_its_job_alone(service, engine_runs):
    huge = [[3e38, 3e38, -3e38, 3e38]]
    good, refused = submit_all(service, [{"inputs": X.tolist()}, {"inputs": huge}])
    assert engine_runs == [4]
    assert isinstance(refused, ServiceError) and refused.status == 400
    assert "instance 0" in refused.message
    want = service.native("tiny", json.dumps({"inputs": X.tolist()}))
    assert_same_answer(json.loads(good), json.loads(want))


# -- loading bundles -------------------------------------------------------------------------


@pytest.fixture
def bundles(tmp_path, make_tiny_bundle) -> dict[str, str]:
    """A good bundle, a BatchNorm one, and one with a flipped byte in its weights."""
    corrupt = make_tiny_bundle(seed=7, version="3").write(tmp_path / "corrupt")
    weights = corrupt / "vertices.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    return {
        "good": str(make_tiny_bundle().write(tmp_path / "good")),
        "batchnorm": str(make_tiny_bundle(batchnorm=True).write(tmp_path / "bn")),
        "corrupt": str(corrupt),
    }


def test_load_serves_the_good_bundles_and_refuses_the_others_naming_them(bundles):
    paths = [bundles["good"], bundles["corrupt"], bundles["batchnorm"]]
    repository, refused = ModelRepository.load(
        paths, allow_custom_architecture=True, max_fresh_draws=3
    )
    assert repository.names() == ["tiny", "tiny-bn"]
    assert len(refused) == 1 and bundles["corrupt"] in refused[0]
    assert repository.get("tiny").max_fresh_draws == 3
    assert repository.get("tiny-bn").max_fresh_draws == 0  # its draws carry BN statistics


def test_load_fails_if_no_bundle_loads(bundles, tmp_path):
    with pytest.raises(BundleError, match="no bundle of the configuration loads") as err:
        ModelRepository.load([bundles["corrupt"], str(tmp_path / "missing")])
    assert bundles["corrupt"] in str(err.value) and "missing" in str(err.value)


def test_load_reuses_the_predictor_of_an_unchanged_bundle(bundles):
    first, _ = ModelRepository.load([bundles["good"]])
    again, _ = ModelRepository.load([bundles["good"]], reuse=first.predictors(), max_fresh_draws=2)
    assert again.get("tiny") is first.get("tiny") and again.get("tiny").max_fresh_draws == 2
    fresh, _ = ModelRepository.load([bundles["good"]])
    assert fresh.get("tiny") is not first.get("tiny")
