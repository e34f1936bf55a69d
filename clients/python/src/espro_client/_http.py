"""The HTTP transports: espro's native JSON door and OIP v2 REST, over one httpx client.

A door builds an :class:`HttpCall` (the request and how to read its answer) without doing any
I/O; :class:`HttpTransport` and :class:`AsyncHttpTransport` send it.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from espro_client import _oip
from espro_client._tls import Tls, is_secure, tls_error
from espro_client.errors import EsproError, Timeout, Unavailable, error_for_status
from espro_client.result import Model, ModelMetadata, ModelVersion, Prediction, TensorSpec

T = TypeVar("T")


@dataclass(frozen=True)
class HttpCall(Generic[T]):
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    answers: frozenset[int] = frozenset({200})
    """Statuses that ``read`` interprets; any other raises the matching error."""

    def answer(self, response: httpx.Response) -> T:
        if response.status_code not in self.answers:
            raise http_error(response)
        return self.read(response)


NO_ANSWER = frozenset({500, 502})
"""Statuses that, without espro's JSON error body, mean no replica answered the request (a
504 without it is a gateway's timeout: :class:`~espro_client.errors.Timeout`)."""


def http_error(response: httpx.Response) -> EsproError:
    """The exception for an error response, with the server's message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    status = response.status_code
    if isinstance(body, dict) and ("error" in body or "detail" in body):
        message = body.get("error", body.get("detail"))
        message = message if isinstance(message, str) else json.dumps(message)
        err = error_for_status(status, message)
    elif status in NO_ANSWER:
        # Not espro's answer: Serve's proxy (a replica died during the request) or a gateway
        # failed before the model answered. Predictions are idempotent, so it may be retried.
        err = Unavailable(f"no model answered ({status}): {response.text[:500]}", status)
    else:
        err = error_for_status(status, response.text or response.reason_phrase)
    if isinstance(err, Unavailable):
        retry_after = response.headers.get("retry-after", "")
        err.retry_after = float(retry_after) if retry_after.isdigit() else None
    return err


def _model_path(name: str, version: str | None) -> str:
    path = f"/v2/models/{quote(name, safe='')}"
    return path if version is None else f"{path}/versions/{quote(version, safe='')}"


class HttpDoor:
    """The calls both HTTP doors share: health, readiness, model list and metadata."""

    lists_models = True

    def live(self) -> HttpCall[bool]:
        return HttpCall("GET", "/v2/health/live", lambda r: bool(r.json()["live"]))

    def ready(self, model: str | None, version: str | None) -> HttpCall[bool]:
        path = "/v2/health/ready" if model is None else f"{_model_path(model, version)}/ready"
        return HttpCall(
            "GET",
            path,
            lambda r: r.status_code == 200 and bool(r.json()["ready"]),
            answers=frozenset({200, 404, 503}),
        )

    def models(self) -> HttpCall[list[Model]]:
        return HttpCall("GET", "/v1/models", _read_models)

    def metadata(self, model: str, version: str | None) -> HttpCall[ModelMetadata]:
        return HttpCall("GET", _model_path(model, version), _read_metadata)


def _newest_only(version: str | None) -> None:
    if version is not None:
        raise ValueError(
            "the native protocol answers with the newest version; use protocol 'oip-rest' "
            "or 'oip-grpc' to pick a version"
        )


def _native_call(
    model: str, version: str | None, data: dict[str, Any], draws: int | None, members: bool
) -> HttpCall[Prediction]:
    """A native predict call carrying ``data`` (``inputs`` or ``images``)."""
    _newest_only(version)
    body = {**data, "draws": draws, "return_members": members}
    return HttpCall("POST", f"/v1/models/{quote(model, safe='')}/predict", _read_native, body)


class NativeDoor(HttpDoor):
    """``POST /v1/models/{name}/predict``: the native JSON door (the newest version only)."""

    def predict(
        self,
        model: str,
        version: str | None,
        x: np.ndarray,
        draws: int | None,
        return_members: bool,
    ) -> HttpCall[Prediction]:
        return _native_call(model, version, {"inputs": x.tolist()}, draws, return_members)

    def predict_images(
        self,
        model: str,
        version: str | None,
        images: Sequence[bytes],
        draws: int | None,
        return_members: bool,
    ) -> HttpCall[Prediction]:
        """``{"images": [base64, ...]}`` in place of ``inputs``."""
        texts = [base64.b64encode(image).decode() for image in images]
        return _native_call(model, version, {"images": texts}, draws, return_members)


class RestDoor(HttpDoor):
    """``POST /v2/models/{name}[/versions/{v}]/infer``, with binary tensors unless told not."""

    def __init__(self, binary: bool = True) -> None:
        self.binary = binary

    def predict(
        self,
        model: str,
        version: str | None,
        x: np.ndarray,
        draws: int | None,
        return_members: bool,
    ) -> HttpCall[Prediction]:
        path = f"{_model_path(model, version)}/infer"
        tensor: dict[str, Any] = {"name": _oip.INPUT, "shape": list(x.shape), "datatype": "FP32"}
        request = {"inputs": [tensor], "parameters": _oip.parameters(draws, return_members)}
        if not self.binary:
            tensor["data"] = x.ravel().tolist()
            return HttpCall("POST", path, _read_infer, request)
        raw = x.astype("<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        request["parameters"]["binary_data_output"] = True
        header = json.dumps(request).encode()
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        return HttpCall("POST", path, _read_infer, content=header + raw, headers=headers)

    def predict_images(
        self,
        model: str,
        version: str | None,
        images: Sequence[bytes],
        draws: int | None,
        return_members: bool,
    ) -> HttpCall[Prediction]:
        """A BYTES tensor ``[N]``: in binary each element length-prefixed, in JSON base64."""
        path = f"{_model_path(model, version)}/infer"
        tensor: dict[str, Any] = {"name": _oip.INPUT, "shape": [len(images)], "datatype": "BYTES"}
        request = {"inputs": [tensor], "parameters": _oip.parameters(draws, return_members)}
        if not self.binary:
            tensor["data"] = [base64.b64encode(image).decode() for image in images]
            return HttpCall("POST", path, _read_infer, request)
        raw = _oip.bytes_tensor(images)
        tensor["parameters"] = {"binary_data_size": len(raw)}
        request["parameters"]["binary_data_output"] = True
        header = json.dumps(request).encode()
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        return HttpCall("POST", path, _read_infer, content=header + raw, headers=headers)


def _read_models(response: httpx.Response) -> list[Model]:
    return [
        Model(m["name"], [ModelVersion(v["version"], v["bundle_sha256"]) for v in m["versions"]])
        for m in response.json()["models"]
    ]


def _read_metadata(response: httpx.Response) -> ModelMetadata:
    body = response.json()
    return ModelMetadata(
        name=body["name"],
        versions=body["versions"],
        platform=body["platform"],
        inputs=[TensorSpec(**t) for t in body["inputs"]],
        outputs=[TensorSpec(**t) for t in body["outputs"]],
    )


def _read_native(response: httpx.Response) -> Prediction:
    body = response.json()
    records = body["predictions"]
    if "label" not in records[0]:
        raise EsproError(
            f"model {body['model_name']!r} is not a classifier: "
            "espro_client supports classification models only"
        )

    def column(key: str, dtype: type) -> np.ndarray:
        return np.array([r[key] for r in records], dtype=dtype)

    def optional(key: str, dtype: type) -> np.ndarray | None:
        return column(key, dtype) if key in records[0] else None

    sets = [r["prediction_set"] for r in records] if "prediction_set" in records[0] else None
    return Prediction(
        probabilities=column("probabilities", np.float32),
        labels=column("label", np.int64),
        confidence=column("confidence", np.float32),
        entropy=column("entropy", np.float32),
        expected_entropy=column("expected_entropy", np.float32),
        mutual_information=column("mutual_information", np.float32),
        disagreement=column("disagreement", np.float32),
        model_name=body["model_name"],
        model_version=body["model_version"],
        bundle_sha256=body["bundle_sha256"],
        class_names=column("class_name", str),
        prediction_set_names=sets,
        abstain=optional("abstain", bool),
        member_probabilities=optional("member_probabilities", np.float32),
    )


def _read_infer(response: httpx.Response) -> Prediction:
    body = response.content
    length = response.headers.get("inference-header-content-length")
    offset = len(body) if length is None else int(length)
    header = json.loads(body[:offset])
    tensors = {}
    for output in header["outputs"]:
        name, datatype, shape = output["name"], output["datatype"], output["shape"]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            tensors[name] = _oip.tensor_from_data(datatype, shape, output["data"])
        else:
            tensors[name] = _oip.tensor_from_bytes(datatype, shape, body[offset : offset + size])
            offset += size
    digest = (header.get("parameters") or {}).get("bundle_sha256")
    return _oip.prediction(tensors, header["model_name"], header.get("model_version", ""), digest)


@contextmanager
def _connection_errors() -> Iterator[None]:
    """httpx's failures to get an answer as :class:`Timeout`, :class:`TLSError` or
    :class:`Unavailable`."""
    try:
        yield
    except httpx.TimeoutException as err:
        raise Timeout(f"no answer in time ({type(err).__name__})") from err
    except httpx.TransportError as err:
        raise tls_error(err) or Unavailable(f"{type(err).__name__}: {err}") from err


def _verify(url: str, tls: Tls) -> ssl.SSLContext | bool:
    """How httpx verifies the server: with ``tls`` for an ``https://`` URL."""
    return tls.ssl_context() if is_secure(url) else True


class HttpTransport:
    """Sends calls over one pooled ``httpx.Client``."""

    def __init__(self, url: str, timeout: float | None, headers: dict[str, str], tls: Tls) -> None:
        self._client = httpx.Client(
            base_url=url, timeout=timeout, headers=headers, verify=_verify(url, tls)
        )

    def send(self, call: HttpCall[T]) -> T:
        with _connection_errors():
            response = self._client.request(
                call.method, call.path, json=call.json, content=call.content, headers=call.headers
            )
        return call.answer(response)

    def close(self) -> None:
        self._client.close()


class AsyncHttpTransport:
    """Sends calls over one pooled ``httpx.AsyncClient``."""

    def __init__(self, url: str, timeout: float | None, headers: dict[str, str], tls: Tls) -> None:
        self._client = httpx.AsyncClient(
            base_url=url, timeout=timeout, headers=headers, verify=_verify(url, tls)
        )

    async def send(self, call: HttpCall[T]) -> T:
        with _connection_errors():
            response = await self._client.request(
                call.method, call.path, json=call.json, content=call.content, headers=call.headers
            )
        return call.answer(response)

    async def close(self) -> None:
        await self._client.aclose()
