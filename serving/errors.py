"""Every error espro raises on purpose, and the one line a pydantic validation error becomes.

The hierarchy::

    EsproError: espro's own refusals; ``espro`` prints one as a single line
    ├── InputError (ValueError): inputs that do not fit the model
    ├── BundleError (ValueError): a bundle that cannot be written or must not be loaded
    ├── CommandError (ValueError): a file or flag that a command refuses
    ├── DeployError (RuntimeError): the application did not start
    ├── DeviceError (ValueError): a device that is no device, or is not here
    ├── ServiceError: a request the service refuses or fails (HTTP status, gRPC code)
    │   └── JSONError: a body that is not valid JSON, or not the JSON a door reads
    └── the trainer's, in :mod:`training.errors` (ValueError)
        ├── ConfigError: a configuration that cannot be read or validated
        ├── DataError: a data set that cannot be read as configured
        └── CheckpointError: an unreadable or outdated checkpoint in a work directory

Argument checks of the tensor functions (:mod:`serving.checks`) raise ``TypeError`` and
``ValueError``: they report a caller's bug, not a refusal. Importing this module imports
neither pydantic nor gRPC (only :attr:`ServiceError.grpc_code` does), so that every part of
espro, the trainer included, can raise and catch these errors.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from serving.quoting import QUOTE_LIMIT, quote

if TYPE_CHECKING:
    import grpc
    from pydantic import ValidationError

STATUS_TRAILER = "espro-status"
"""The gRPC trailing metadata key under which espro sends a refusal's HTTP status, so that a
client tells espro's answers from those of a proxy in front of it by code, not by text."""


class EsproError(Exception):
    """The base of every error espro raises on purpose; its message says what to change."""


class InputError(EsproError, ValueError):
    """Inputs that do not match the bundle's input spec; the message says what was expected."""


class BundleError(EsproError, ValueError):
    """A bundle that cannot be written or must not be loaded; the message names the problem."""


class CommandError(EsproError, ValueError):
    """A file or flag that a command refuses."""


class DeviceError(EsproError, ValueError):
    """A device name that names no device, or a CUDA device where there is none."""


class DeployError(EsproError, RuntimeError):
    """The application did not start; the message is what its replicas raised."""


class ServiceError(EsproError):
    """A request the service refuses or fails, answered with the HTTP ``status`` and the
    matching :attr:`grpc_code`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def grpc_code(self) -> grpc.StatusCode:
        """The gRPC status code matching ``status`` (``INTERNAL`` for any other)."""
        import grpc

        return grpc.StatusCode[GRPC_CODES.get(self.status, "INTERNAL")]

    def rest_body(self) -> bytes:
        """The OIP REST error body, ``{"error": message}``."""
        return json.dumps({"error": self.message}).encode()


GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    503: "UNAVAILABLE",
}
"""The gRPC status code's name for each HTTP status espro answers with, but 500 (``INTERNAL``)."""


class JSONError(ServiceError):
    """A body that is not valid JSON, or not JSON a door reads; ``status`` is 400, or 413
    past a size limit."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status, message)


def describe_validation_error(err: ValidationError) -> str:
    """Every problem of a pydantic validation error as ``field.path: message``; a path longer
    than a message should quote (an unknown key a client sent) is cut."""

    def where(loc: tuple[str | int, ...]) -> str:
        path = ".".join(str(p) for p in loc) or "<root>"
        return path if len(path) <= QUOTE_LIMIT else quote(path)

    return "; ".join(f"{where(e['loc'])}: {e['msg']}" for e in err.errors())
