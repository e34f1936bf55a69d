"""What every door of the deployment shares, without Ray: refusals as HTTP answers and gRPC
statuses, the bearer token of a gRPC call, and request bodies read within their limit."""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from typing import Any, Protocol

from starlette.responses import Response

from serving.errors import STATUS_TRAILER, ServiceError
from serving.quoting import quote


class GrpcContext(Protocol):
    """What espro uses of a gRPC call's context: Serve's proxy and the direct door each hand
    the replica their own kind."""

    def invocation_metadata(self) -> Any: ...
    def set_code(self, code: Any) -> None: ...
    def set_details(self, details: str) -> None: ...
    def set_trailing_metadata(self, metadata: Any) -> None: ...


def http_error(err: ServiceError) -> Response:
    """``err`` as an HTTP answer: its status and JSON body, and a Bearer challenge on 401."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return Response(
        err.rest_body(), status_code=err.status, media_type="application/json", headers=headers
    )


def grpc_error(context: GrpcContext, err: ServiceError) -> None:
    """Answer ``err`` with its gRPC code, and its HTTP status in the :data:`~serving.errors.
    STATUS_TRAILER` trailer, which tells a client that espro answered, not a proxy."""
    context.set_code(err.grpc_code)
    context.set_details(err.message)
    context.set_trailing_metadata([(STATUS_TRAILER, str(err.status))])


def grpc_authorization(context: GrpcContext) -> str | None:
    """The call's ``authorization`` metadata, if it has one."""
    return dict(context.invocation_metadata()).get("authorization")


def inference_header_length(headers: Mapping[str, str]) -> int | None:
    """The OIP binary extension's ``Inference-Header-Content-Length``: None where absent, a
    400 where it is not a byte count."""
    value = headers.get("inference-header-content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise ServiceError(
            400, f"Inference-Header-Content-Length must be a byte count, got {quote(value)}"
        )
    return int(value)


async def read_body(
    chunks: AsyncIterable[bytes], content_length: str | None, limit: int
) -> bytearray:
    """A request body, refused with 413 past ``limit`` bytes before it is all read.

    A ``Content-Length`` over the limit is refused before any chunk; chunks are appended to
    one buffer as they arrive, so a body is held once rather than as chunks and their join,
    and it grows with what arrives, not with what a header claims."""
    header = content_length or ""
    if header.isascii() and header.isdigit() and int(header) > limit:
        raise ServiceError(413, f"the body has {header} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in chunks:
        if len(body) + len(chunk) > limit:
            raise ServiceError(413, f"the body exceeds the limit of {limit} bytes")
        body += chunk
    return body
