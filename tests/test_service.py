"""The three doors answer alike: native JSON, OIP REST (JSON and binary) and OIP gRPC, with
requests and responses encoded and decoded by the real tritonclient libraries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request as triton_grpc_request

from serving.bundle import load_bundle
from serving.oip import OIPError
from serving.predictor import Predictor
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.service import (
    CLASSIFICATION_OUTPUTS,
    INPUT,
    InferenceService,
    Job,
    ModelRepository,
    model_metadata,
)

X = (torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 2).numpy()

FP32_ATOL = 1e-5
"""How far float32 outputs may differ when computed through other batch shapes, kernels or
engines: the tolerance the product documents (docs/performance.md, every engine against the
reference; docs/client.md, every transport against the in-process Predictor). The last bits
of a float change with the batch shape on some CPUs (AVX-512 and AMX kernels)."""


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
    with pytest.raises(OIPError) as err:
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
    with pytest.raises(OIPError, match="unknown model"):
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
        with pytest.raises(OIPError, match=r"instance \d+ .* not finite") as refused:
            service.native("tiny", json.dumps(body))
        assert refused.value.status == 400
    good, bad = (service.native_job("tiny", json.dumps({"inputs": x})) for x in (X.tolist(), huge))
    outputs = good.member_outputs(torch.cat([good.inputs, bad.inputs]))
    answered, refused = Job.predictions([good, bad], outputs)
    assert isinstance(refused, OIPError) and "instance 0" in refused.message
    assert_same_answer(json.loads(good.encode(answered)), json.loads(good.run()))
