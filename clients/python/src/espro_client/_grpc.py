"""The OIP v2 gRPC transport (needs the ``grpc`` extra: ``pip install 'espro-client[grpc]'``).

:class:`GrpcDoor` builds a :class:`GrpcCall` (the RPC, its message and how to read its
answer) without doing any I/O; :class:`GrpcTransport` and :class:`AsyncGrpcTransport` send it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from espro_client import _oip
from espro_client._proto import grpc_predict_v2_pb2 as pb
from espro_client._proto.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from espro_client._tls import Tls, grpc_tls_error, is_secure
from espro_client.errors import EsproError, Unavailable, error_class, error_for_status
from espro_client.result import ModelMetadata, Prediction, TensorSpec

T = TypeVar("T")

_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
"""Leave message size limits to the server (its ``max_body_bytes``)."""


@dataclass(frozen=True)
class GrpcCall(Generic[T]):
    """One RPC of ``inference.GRPCInferenceService`` and how to read its answer."""

    rpc: str
    request: Message
    read: Callable[[Any], T]


def target(url: str) -> str:
    """The ``host:port`` of ``grpc://host:port``, ``grpcs://host:port`` or ``host:port``."""
    return url.removeprefix("grpc://").removeprefix("grpcs://").rstrip("/")


def credentials(url: str, tls: Tls) -> grpc.ChannelCredentials | None:
    """The TLS credentials of a ``grpcs://`` URL (no ``ca_cert``: gRPC's default roots,
    which ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` overrides); ``None``: no TLS."""
    return grpc.ssl_channel_credentials(*tls.pem()) if is_secure(url) else None


class GrpcDoor:
    """The OIP v2 gRPC calls. The protocol has no model list and no bundle hashes."""

    lists_models = False

    def live(self) -> GrpcCall[bool]:
        return GrpcCall("ServerLive", pb.ServerLiveRequest(), lambda r: r.live)

    def ready(self, model: str | None, version: str | None) -> GrpcCall[bool]:
        if model is None:
            return GrpcCall("ServerReady", pb.ServerReadyRequest(), lambda r: r.ready)
        request = pb.ModelReadyRequest(name=model, version=version or "")
        return GrpcCall("ModelReady", request, lambda r: r.ready)

    def metadata(self, model: str, version: str | None) -> GrpcCall[ModelMetadata]:
        request = pb.ModelMetadataRequest(name=model, version=version or "")
        return GrpcCall("ModelMetadata", request, _read_metadata)

    def predict(
        self,
        model: str,
        version: str | None,
        x: np.ndarray,
        draws: int | None,
        return_members: bool,
    ) -> GrpcCall[Prediction]:
        request = pb.ModelInferRequest(model_name=model, model_version=version or "")
        request.inputs.add(name=_oip.INPUT, datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.astype("<f4").tobytes())
        _set_parameters(request, draws, return_members)
        return GrpcCall("ModelInfer", request, _read_infer)

    def predict_images(
        self,
        model: str,
        version: str | None,
        images: Sequence[bytes],
        draws: int | None,
        return_members: bool,
    ) -> GrpcCall[Prediction]:
        """A BYTES tensor ``[N]`` whose ``bytes_contents`` are the encoded images."""
        request = pb.ModelInferRequest(model_name=model, model_version=version or "")
        tensor = request.inputs.add(name=_oip.INPUT, datatype="BYTES", shape=[len(images)])
        tensor.contents.bytes_contents.extend(images)
        _set_parameters(request, draws, return_members)
        return GrpcCall("ModelInfer", request, _read_infer)


def _set_parameters(request: pb.ModelInferRequest, draws: int | None, members: bool) -> None:
    for key, value in _oip.parameters(draws, members).items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].int64_param = value


def _read_metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    def specs(tensors: Any) -> list[TensorSpec]:
        return [TensorSpec(t.name, t.datatype, list(t.shape)) for t in tensors]

    return ModelMetadata(
        name=response.name,
        versions=list(response.versions),
        platform=response.platform,
        inputs=specs(response.inputs),
        outputs=specs(response.outputs),
    )


def _read_infer(response: pb.ModelInferResponse) -> Prediction:
    if len(response.raw_output_contents) != len(response.outputs):
        raise EsproError("the server sent outputs without raw_output_contents")
    tensors = {
        output.name: _oip.tensor_from_bytes(output.datatype, output.shape, raw)
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    digest = response.parameters.get("bundle_sha256")
    return _oip.prediction(
        tensors,
        response.model_name,
        response.model_version,
        None if digest is None else digest.string_param,
    )


STATUS_TRAILER = "espro-status"
"""The trailing metadata in which espro sends the HTTP status of a call it refuses or fails;
an error without it is not espro's answer (``serving.errors.STATUS_TRAILER``)."""
NO_ANSWER = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
"""Codes that, without espro's trailer, mean no replica answered the RPC: Serve's proxy failed
it because the replica died."""
BACKPRESSURE = "backpressure"
"""What the details of Serve's proxy name when it refuses a call past a full queue."""


def _espro_status(err: grpc.RpcError) -> int | None:
    """The HTTP status in espro's trailer of a failed RPC; ``None`` if espro did not answer."""
    trailers = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in trailers:
        if key == STATUS_TRAILER and isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def _rpc_error(err: grpc.RpcError) -> EsproError:
    """The exception for a failed RPC, with the server's details; its kind follows from the
    status espro sent, or else from the code."""
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    details: str = err.details() or code.name  # type: ignore[attr-defined]
    status = _espro_status(err)
    if status is not None:
        return error_class(status)(details, code.name)
    if code is grpc.StatusCode.UNAVAILABLE and (tls := grpc_tls_error(details)):
        return tls
    if code in NO_ANSWER:
        # Predictions are idempotent: a retry is safe.
        return Unavailable(f"no model answered ({code.name}): {details}", code.name)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and BACKPRESSURE in details:
        # Serve's proxy past a full queue sends the code that gRPC uses for a message over
        # the size limit, and neither sends a trailer: gRPC leaves only the details to tell
        # them apart.
        return Unavailable(details, code.name)
    return error_for_status(code.name, details)


class GrpcTransport:
    """Sends calls over one ``grpc.Channel``."""

    def __init__(self, url: str, timeout: float | None, headers: dict[str, str], tls: Tls) -> None:
        secure = credentials(url, tls)
        self._channel = (
            grpc.insecure_channel(target(url), options=_UNLIMITED)
            if secure is None
            else grpc.secure_channel(target(url), secure, options=_UNLIMITED)
        )
        self._stub = GRPCInferenceServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(headers.items())

    def send(self, call: GrpcCall[T]) -> T:
        try:
            response = getattr(self._stub, call.rpc)(
                call.request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise _rpc_error(err) from None
        return call.read(response)

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport:
    """Sends calls over one ``grpc.aio.Channel``, opened on the first call (in its loop)."""

    def __init__(self, url: str, timeout: float | None, headers: dict[str, str], tls: Tls) -> None:
        self._target = target(url)
        self._credentials = credentials(url, tls)
        self._timeout = timeout
        self._metadata = tuple(headers.items())
        self._channel: grpc.aio.Channel | None = None
        self._stub: GRPCInferenceServiceStub | None = None

    async def send(self, call: GrpcCall[T]) -> T:
        if self._stub is None:
            self._channel = (
                grpc.aio.insecure_channel(self._target, options=_UNLIMITED)
                if self._credentials is None
                else grpc.aio.secure_channel(self._target, self._credentials, options=_UNLIMITED)
            )
            self._stub = GRPCInferenceServiceStub(self._channel)
        try:
            response = await getattr(self._stub, call.rpc)(
                call.request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise _rpc_error(err) from None
        return call.read(response)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
