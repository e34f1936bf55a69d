"""The OIP v2 gRPC service as methods named after its RPCs, without Ray.

Serve's gRPC proxy and the replica's direct door both call a deployment's methods by RPC
name; :class:`OipGrpcMethods` holds them so that the deployment inherits them and tests call
them with a fake context. The class needs ``service``, ``tokens``, ``config`` and ``metrics``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from serving.doors import GrpcContext, grpc_authorization, grpc_error
from serving.errors import ServiceError
from serving.oip import INTERNAL_ERROR
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.quoting import quote
from serving.service import model_metadata

if TYPE_CHECKING:
    from serving.auth import BearerTokens
    from serving.service import InferenceService
    from serving.settings import AppConfig

logger = logging.getLogger(__name__)


class RequestCounter(Protocol):
    """Where each answered call is counted."""

    def request(self, door: str, model: str, status: int, seconds: float) -> None: ...


class OipGrpcMethods:
    """Every RPC of ``inference.GRPCInferenceService``; each checks the bearer token but the
    health RPCs, which stay open for probes."""

    service: InferenceService
    tokens: BearerTokens
    config: AppConfig
    metrics: RequestCounter

    def model_tag(self, name: str) -> str:
        """``name`` as a metric label if it is served: an unknown name (any text a client
        sends) would make a label Ray cannot encode, or an unbounded number of series."""
        return name if name in self.service.repository.names() else "unknown"

    def _grpc_denied(self, context: GrpcContext) -> bool:
        """Refuse a gRPC call without a valid token (UNAUTHENTICATED); True if refused."""
        try:
            self.tokens.check(grpc_authorization(context))
        except ServiceError as err:
            grpc_error(context, err)
            return True
        return False

    async def ServerLive(
        self, request: pb.ServerLiveRequest, grpc_context: GrpcContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, grpc_context: GrpcContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.service.repository.names()))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, grpc_context: GrpcContext
    ) -> pb.ModelReadyResponse:
        if self._grpc_denied(grpc_context):
            return pb.ModelReadyResponse()
        try:
            self.service.repository.get(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, grpc_context: GrpcContext
    ) -> pb.ServerMetadataResponse:
        if self._grpc_denied(grpc_context):
            return pb.ServerMetadataResponse()
        return self.service.server_metadata().to_grpc()

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: GrpcContext
    ) -> pb.ModelMetadataResponse:
        if self._grpc_denied(grpc_context):
            return pb.ModelMetadataResponse()
        try:
            return model_metadata(self.service.repository, request.name, request.version).to_grpc()
        except ServiceError as err:
            grpc_error(grpc_context, err)
            return pb.ModelMetadataResponse()

    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: GrpcContext
    ) -> pb.ModelInferResponse:
        return await self.grpc_infer(request, grpc_context, door="grpc")

    async def grpc_infer(
        self, request: pb.ModelInferRequest, grpc_context: GrpcContext, *, door: str
    ) -> pb.ModelInferResponse:
        """Answer an inference call from Serve's proxy or the direct door (``door``)."""
        start = time.perf_counter()
        response, status = pb.ModelInferResponse(), 200
        try:
            self.tokens.check(grpc_authorization(grpc_context))
            if (size := request.ByteSize()) > (limit := self.config.max_body_bytes):
                raise ServiceError(413, f"the message has {size} bytes; the limit is {limit}")
            response = await self.service.submit(self.service.grpc_job(request))
        except ServiceError as err:
            status = err.status
            grpc_error(grpc_context, err)
        except Exception:
            logger.exception("%s request for model %s failed", door, quote(request.model_name))
            status = 500
            grpc_error(grpc_context, ServiceError(500, INTERNAL_ERROR))
        model = self.model_tag(request.model_name)
        self.metrics.request(door, model, status, time.perf_counter() - start)
        return response
