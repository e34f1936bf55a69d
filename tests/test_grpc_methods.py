"""The OIP gRPC methods without Ray: tokens, health, metadata, inference and its counting."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from helpers import GrpcContext, tiny_bundle
from serving.auth import BearerTokens
from serving.errors import STATUS_TRAILER
from serving.grpc_methods import OipGrpcMethods
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.service import INPUT, InferenceService, ModelRepository
from serving.settings import AppConfig

TOKEN = GrpcContext.TOKEN


class Methods(OipGrpcMethods):
    def __init__(self, path: str) -> None:
        repository, refused = ModelRepository.load([path])
        assert refused == []
        self.service = InferenceService(repository)
        self.tokens = BearerTokens([TOKEN])
        self.config = AppConfig(bundles=[path], max_body_bytes=4096)
        self.counted: list[tuple[str, str, int]] = []
        self.metrics = self

    def request(self, door: str, model: str, status: int, seconds: float) -> None:
        self.counted.append((door, model, status))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return str(tiny_bundle().write(tmp_path_factory.mktemp("grpc") / "tiny"))


@pytest.fixture
def methods(bundle) -> Methods:
    """Fresh for each test: its batcher binds to the event loop of the test's first call."""
    return Methods(bundle)


def call(method, request, context):
    return asyncio.run(method(request, context))


def test_health_is_open_and_the_rest_needs_the_token(methods):
    assert call(methods.ServerLive, pb.ServerLiveRequest(), GrpcContext(None)).live
    assert call(methods.ServerReady, pb.ServerReadyRequest(), GrpcContext(None)).ready
    context = GrpcContext(None)
    answer = call(methods.ModelReady, pb.ModelReadyRequest(name="tiny"), context)
    assert not answer.ready and context.code == grpc.StatusCode.UNAUTHENTICATED
    assert context.trailer == [(STATUS_TRAILER, "401")]
    assert call(methods.ModelReady, pb.ModelReadyRequest(name="tiny"), GrpcContext()).ready
    assert not call(methods.ModelReady, pb.ModelReadyRequest(name="nope"), GrpcContext()).ready


def test_metadata_names_the_model_or_answers_not_found(methods):
    assert call(methods.ServerMetadata, pb.ServerMetadataRequest(), GrpcContext()).name == "espro"
    answer = call(methods.ModelMetadata, pb.ModelMetadataRequest(name="tiny"), GrpcContext())
    assert answer.name == "tiny" and answer.inputs[0].name == INPUT
    context = GrpcContext()
    call(methods.ModelMetadata, pb.ModelMetadataRequest(name="nope"), context)
    assert context.code == grpc.StatusCode.NOT_FOUND and "nope" in context.details


def _infer_request(rows: int) -> pb.ModelInferRequest:
    x = np.zeros((rows, 4), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name=INPUT, datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return pb.ModelInferRequest(model_name="tiny", inputs=[tensor])


def test_inference_answers_refuses_and_counts_every_call(methods):
    async def calls() -> pb.ModelInferResponse:
        answer = await methods.ModelInfer(_infer_request(2), GrpcContext())
        await methods.ModelInfer(_infer_request(400), too_big)
        await methods.ModelInfer(pb.ModelInferRequest(model_name="x" * 300), unknown)
        return answer

    too_big, unknown = GrpcContext(), GrpcContext()
    answer = asyncio.run(calls())
    assert answer.model_name == "tiny" and answer.outputs
    assert too_big.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert too_big.trailer == [(STATUS_TRAILER, "413")]
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    assert methods.counted == [
        ("grpc", "tiny", 200),
        ("grpc", "tiny", 413),
        ("grpc", "unknown", 404),
    ]
