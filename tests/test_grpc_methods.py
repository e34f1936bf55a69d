"""The OIP gRPC methods without Ray: tokens, health, metadata, inference and its counting."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from helpers import tiny_bundle
from serving.auth import BearerTokens
from serving.errors import STATUS_TRAILER
from serving.grpc_methods import OipGrpcMethods
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.service import INPUT, InferenceService, ModelRepository
from serving.settings import AppConfig

TOKEN = "tok-" + "3" * 24


class Context:
    """A gRPC context that records what a method answers."""

    def __init__(self, token: str | None = TOKEN) -> None:
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.code = self.details = self.trailer = None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailer = metadata


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
    assert call(methods.ServerLive, pb.ServerLiveRequest(), Context(None)).live
    assert call(methods.ServerReady, pb.ServerReadyRequest(), Context(None)).ready
    context = Context(None)
    answer = call(methods.ModelReady, pb.ModelReadyRequest(name="tiny"), context)
    assert not answer.ready and context.code == grpc.StatusCode.UNAUTHENTICATED
    assert context.trailer == [(STATUS_TRAILER, "401")]
    assert call(methods.ModelReady, pb.ModelReadyRequest(name="tiny"), Context()).ready
    assert not call(methods.ModelReady, pb.ModelReadyRequest(name="nope"), Context()).ready


def test_metadata_names_the_model_or_answers_not_found(methods):
    assert call(methods.ServerMetadata, pb.ServerMetadataRequest(), Context()).name == "espro"
    answer = call(methods.ModelMetadata, pb.ModelMetadataRequest(name="tiny"), Context())
    assert answer.name == "tiny" and answer.inputs[0].name == INPUT
    context = Context()
    call(methods.ModelMetadata, pb.ModelMetadataRequest(name="nope"), context)
    assert context.code == grpc.StatusCode.NOT_FOUND and "nope" in context.details


def _infer_request(rows: int) -> pb.ModelInferRequest:
    x = np.zeros((rows, 4), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name=INPUT, datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return pb.ModelInferRequest(model_name="tiny", inputs=[tensor])


def test_inference_answers_refuses_and_counts_every_call(methods):
    async def calls() -> pb.ModelInferResponse:
        answer = await methods.ModelInfer(_infer_request(2), Context())
        await methods.ModelInfer(_infer_request(400), too_big)
        await methods.ModelInfer(pb.ModelInferRequest(model_name="x" * 300), unknown)
        return answer

    too_big, unknown = Context(), Context()
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
