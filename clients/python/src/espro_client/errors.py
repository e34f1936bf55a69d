"""The exceptions a client raises, one per kind of answer the caller handles differently.

The kind follows from the HTTP status or the gRPC status code, not from the message::

    EsproError        anything else, e.g. espro's own 500 / INTERNAL
    ├── BadRequest    400, 413, 415, 422 / INVALID_ARGUMENT, RESOURCE_EXHAUSTED
    ├── Unauthorized  401, 403 / UNAUTHENTICATED, PERMISSION_DENIED
    ├── NotFound      404 / NOT_FOUND
    ├── Unavailable   429, 503 / UNAVAILABLE; no connection; no model answered (retried)
    ├── Timeout       408, 504 / DEADLINE_EXCEEDED; no answer in time (retried)
    └── TLSError      the TLS handshake failed: a certificate that does not verify

"No model answered" is a failure that a proxy, not espro, sent: the transports tell them apart
by espro's JSON error body (HTTP) or its ``espro-status`` trailer (gRPC). A TLS failure is
told by the ``ssl`` exception (HTTP) or by the ``UNAVAILABLE`` details naming a failed
handshake (gRPC).
"""

from __future__ import annotations


class EsproError(Exception):
    """A request the server refused or could not answer.

    ``status`` is the HTTP status (``int``) or the gRPC status code's name (``str``), or
    ``None`` when no answer arrived; ``message`` is the server's explanation.
    """

    def __init__(self, message: str, status: int | str | None = None) -> None:
        super().__init__(message if status is None else f"{status}: {message}")
        self.message = message
        self.status = status


class BadRequest(EsproError):
    """The request is wrong (bad input, parameter or size): retrying will not help."""


class Unauthorized(EsproError):
    """The server requires a bearer token (``Client(token=...)``) and got none or a wrong one,
    or refuses this one."""


class NotFound(EsproError):
    """No such model or version."""


class Unavailable(EsproError):
    """The server is busy, not ready or unreachable: the client retries these.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(
        self, message: str, status: int | str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class Timeout(EsproError):
    """No answer in time: the client's timeout passed, or the server's or a gateway's (HTTP 408
    or 504, gRPC ``DEADLINE_EXCEEDED``). The client retries these unless
    ``Retry(timeouts=False)``."""


class TLSError(EsproError):
    """The TLS handshake failed: the server's certificate does not verify against the trusted
    CAs (``ca_cert``), or the server refused this client's (``client_cert``). Not retried:
    only a change of configuration helps."""


_BY_HTTP_STATUS: dict[int, type[EsproError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    408: Timeout,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
    429: Unavailable,
    503: Unavailable,
    504: Timeout,
}
_BY_GRPC_CODE: dict[str, type[EsproError]] = {
    "INVALID_ARGUMENT": BadRequest,
    "RESOURCE_EXHAUSTED": BadRequest,
    "NOT_FOUND": NotFound,
    "UNAUTHENTICATED": Unauthorized,
    "PERMISSION_DENIED": Unauthorized,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": Timeout,
}


def error_class(status: int | str) -> type[EsproError]:
    """The exception class for an HTTP status or gRPC code name (``EsproError`` for the rest)."""
    if isinstance(status, int):
        return _BY_HTTP_STATUS.get(status, EsproError)
    return _BY_GRPC_CODE.get(status, EsproError)


def error_for_status(status: int | str, message: str) -> EsproError:
    """The exception for an HTTP status or gRPC code name, with the server's ``message``."""
    return error_class(status)(message, status)
