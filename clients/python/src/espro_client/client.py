"""``Client`` and ``AsyncClient``: one API over three protocols.

Both build the same calls (``_ClientBase``) and differ only in how they send them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
from numpy.typing import ArrayLike

from espro_client._http import AsyncHttpTransport, HttpTransport, NativeDoor, RestDoor
from espro_client._tls import Tls, check_token_is_safe, is_secure
from espro_client.errors import Unavailable
from espro_client.result import Model, ModelMetadata, Prediction, concatenate
from espro_client.retry import Retry

Protocol = Literal["native", "oip-rest", "oip-grpc"]
"""The API a client speaks: ``native``, espro's own JSON API (``/v1``); ``oip-rest``, the Open
Inference Protocol v2 over REST (``/v2``); ``oip-grpc``, the Open Inference Protocol v2 over
gRPC."""


class _ClientBase:
    """Configuration, and the calls every operation makes, for both clients."""

    def __init__(
        self,
        url: str,
        *,
        protocol: Protocol = "native",
        timeout: float | None = 30.0,
        retry: Retry | None = None,
        chunk_size: int = 1024,
        binary: bool = True,
        token: str | None = None,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        allow_insecure: bool = False,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.url = url
        self.protocol = protocol
        self.timeout = timeout
        self.retry = Retry() if retry is None else retry
        self.chunk_size = chunk_size
        self._door: Any
        if protocol == "native":
            self._door = NativeDoor()
        elif protocol == "oip-rest":
            self._door = RestDoor(binary)
        elif protocol == "oip-grpc":
            from espro_client._grpc import GrpcDoor

            self._door = GrpcDoor()
        else:
            raise ValueError(
                f"protocol must be 'native', 'oip-rest' or 'oip-grpc', got {protocol!r}"
            )
        _check_scheme(url, protocol)
        tls = Tls(ca_cert, client_cert, client_key)
        if tls.configured and not is_secure(url):
            raise ValueError(
                f"ca_cert, client_cert and client_key need an https:// or grpcs:// URL, got {url}"
            )
        headers = {}
        if token is not None:
            check_token_is_safe(url, allow_insecure)
            headers["authorization"] = f"Bearer {token}"
        self._transport = self._open(url, timeout, headers, tls)

    def _open(self, url: str, timeout: float | None, headers: dict[str, str], tls: Tls) -> Any:
        """The transport that sends this client's calls with ``headers`` (gRPC: metadata)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, protocol={self.protocol!r})"

    def _predict_calls(
        self,
        model: str,
        inputs: ArrayLike,
        version: str | None,
        draws: int | None,
        return_members: bool,
    ) -> list[Any]:
        """One call per chunk of ``chunk_size`` instances."""
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"inputs must be a batch [B, *input_shape] with B ≥ 1, got {x.shape}")
        return [
            self._door.predict(model, version, x[i : i + self.chunk_size], draws, return_members)
            for i in range(0, len(x), self.chunk_size)
        ]

    def _image_calls(
        self,
        model: str,
        images: Sequence[str | Path | bytes],
        version: str | None,
        draws: int | None,
        return_members: bool,
    ) -> list[Any]:
        """One call per chunk of ``chunk_size`` images, each read from its file or given."""
        if isinstance(images, str | Path | bytes) or not images:
            raise ValueError("images must be a non-empty sequence of paths or encoded images")
        encoded = [
            image if isinstance(image, bytes) else Path(image).read_bytes() for image in images
        ]
        return [
            self._door.predict_images(
                model, version, encoded[i : i + self.chunk_size], draws, return_members
            )
            for i in range(0, len(encoded), self.chunk_size)
        ]

    def _models_call(self) -> Any:
        if not self._door.lists_models:
            raise NotImplementedError(
                "OIP gRPC has no model list; use protocol 'native' or 'oip-rest'"
            )
        return self._door.models()


def _check_scheme(url: str, protocol: Protocol) -> None:
    """A ``ValueError`` for a URL whose scheme is not one of ``protocol``'s."""
    if protocol == "oip-grpc":
        if "://" in url and not url.startswith(("grpc://", "grpcs://")):
            raise ValueError(f"oip-grpc needs a grpc://, grpcs:// or host:port URL, got {url}")
    elif not url.startswith(("http://", "https://")):
        raise ValueError(f"{protocol} needs an http:// or https:// URL, got {url}")


class Client(_ClientBase):
    """A synchronous espro client holding one connection pool (or gRPC channel).

    >>> with Client("http://127.0.0.1:8000") as client:
    ...     prediction = client.predict("mnist1d", x)

    ``protocol`` is the API spoken (:data:`Protocol`). ``url`` is ``http://host:port`` or
    ``https://host:port`` for ``native`` and ``oip-rest``, ``grpc://host:port`` (or
    ``host:port``) or ``grpcs://host:port`` for ``oip-grpc``.
    ``timeout`` bounds each request in seconds (``None``: no
    bound); ``retry`` says how to retry 503 / ``UNAVAILABLE`` and connection failures;
    ``predict`` sends at most ``chunk_size`` instances per request; ``binary=False`` sends
    OIP REST tensors as JSON instead of binary; ``token`` is sent as ``Authorization: Bearer``
    to a server that requires one.

    ``https://`` and ``grpcs://`` speak TLS and verify the server's certificate against
    ``ca_cert`` (a PEM bundle) or, without one, the default trust store;
    ``client_cert`` and ``client_key`` (PEM) answer a server that asks for a client
    certificate. A ``token`` is refused (``ValueError``) where it would travel unencrypted
    beyond loopback, unless ``allow_insecure``.
    """

    def _open(self, url: str, timeout: float | None, headers: dict[str, str], tls: Tls) -> Any:
        if self.protocol == "oip-grpc":
            from espro_client._grpc import GrpcTransport

            return GrpcTransport(url, timeout, headers, tls)
        return HttpTransport(url, timeout, headers, tls)

    def _send(self, call: Any) -> Any:
        return self.retry.call(lambda: self._transport.send(call))

    def predict(
        self,
        model: str,
        inputs: ArrayLike,
        *,
        version: str | None = None,
        draws: int | None = None,
        return_members: bool = False,
    ) -> Prediction:
        """Predict raw instances ``[B, *input_shape]`` with ``model`` (its newest version
        unless ``version`` is given; the ``native`` protocol cannot pick one).

        ``draws`` uses that many members per simplex; ``return_members`` also returns every
        member's probabilities.
        """
        calls = self._predict_calls(model, inputs, version, draws, return_members)
        return concatenate([self._send(call) for call in calls])

    def predict_images(
        self,
        model: str,
        images: Sequence[str | Path | bytes],
        *,
        version: str | None = None,
        draws: int | None = None,
        return_members: bool = False,
    ) -> Prediction:
        """Predict encoded images (PNG or JPEG files, by path or as bytes) with a model trained
        on images: the server decodes them as its bundle's training images were (a model
        without an image spec refuses them). Options as for :meth:`predict`.
        """
        calls = self._image_calls(model, images, version, draws, return_members)
        return concatenate([self._send(call) for call in calls])

    def health(self) -> bool:
        """Whether the server is up (``False`` when it cannot be reached; a
        :class:`~espro_client.errors.TLSError` when TLS fails). Not retried."""
        try:
            return bool(self._transport.send(self._door.live()))
        except Unavailable:
            return False

    def ready(self, model: str | None = None, version: str | None = None) -> bool:
        """Whether the server (or ``model``, at ``version``) takes requests (see
        :meth:`health`). Not retried."""
        try:
            return bool(self._transport.send(self._door.ready(model, version)))
        except Unavailable:
            return False

    def models(self) -> list[Model]:
        """The served models, their versions and bundle hashes (``native`` and ``oip-rest``
        only)."""
        models: list[Model] = self._send(self._models_call())
        return models

    def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        """A model's OIP metadata: versions, input and output tensors."""
        metadata: ModelMetadata = self._send(self._door.metadata(model, version))
        return metadata

    def close(self) -> None:
        """Close the connections."""
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The asyncio twin of :class:`Client`: the same arguments, methods and results.

    >>> async with AsyncClient("grpc://127.0.0.1:9000", protocol="oip-grpc") as client:
    ...     prediction = await client.predict("mnist1d", x)

    The chunks of one ``predict`` go one after another; run several ``predict`` calls with
    ``asyncio.gather`` to send them concurrently.
    """

    def _open(self, url: str, timeout: float | None, headers: dict[str, str], tls: Tls) -> Any:
        if self.protocol == "oip-grpc":
            from espro_client._grpc import AsyncGrpcTransport

            return AsyncGrpcTransport(url, timeout, headers, tls)
        return AsyncHttpTransport(url, timeout, headers, tls)

    async def _send(self, call: Any) -> Any:
        return await self.retry.acall(lambda: self._transport.send(call))

    async def predict(
        self,
        model: str,
        inputs: ArrayLike,
        *,
        version: str | None = None,
        draws: int | None = None,
        return_members: bool = False,
    ) -> Prediction:
        """See :meth:`Client.predict`."""
        calls = self._predict_calls(model, inputs, version, draws, return_members)
        return concatenate([await self._send(call) for call in calls])

    async def predict_images(
        self,
        model: str,
        images: Sequence[str | Path | bytes],
        *,
        version: str | None = None,
        draws: int | None = None,
        return_members: bool = False,
    ) -> Prediction:
        """See :meth:`Client.predict_images`."""
        calls = self._image_calls(model, images, version, draws, return_members)
        return concatenate([await self._send(call) for call in calls])

    async def health(self) -> bool:
        """See :meth:`Client.health`."""
        try:
            return bool(await self._transport.send(self._door.live()))
        except Unavailable:
            return False

    async def ready(self, model: str | None = None, version: str | None = None) -> bool:
        """See :meth:`Client.ready`."""
        try:
            return bool(await self._transport.send(self._door.ready(model, version)))
        except Unavailable:
            return False

    async def models(self) -> list[Model]:
        """See :meth:`Client.models`."""
        models: list[Model] = await self._send(self._models_call())
        return models

    async def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        """See :meth:`Client.metadata`."""
        metadata: ModelMetadata = await self._send(self._door.metadata(model, version))
        return metadata

    async def close(self) -> None:
        """Close the connections."""
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
