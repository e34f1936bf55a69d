"""Open Inference Protocol v2 tensors, shared by the ``oip-rest`` and ``oip-grpc`` protocols."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from espro_client.errors import EsproError
from espro_client.result import Prediction

INPUT = "input"
"""The one input tensor of an espro model: raw instances ``[batch, *input_shape]``, FP32."""

_DTYPES = {"BOOL": np.dtype("?"), "INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}
"""The datatypes of espro's outputs."""


def _dtype(datatype: str) -> np.dtype:
    try:
        return _DTYPES[datatype]
    except KeyError:
        raise EsproError(f"unexpected output datatype {datatype!r}") from None


def bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor in the binary layout: each element preceded by its 4-byte length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def tensor_from_bytes(datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """An output tensor sent in the binary layout (little-endian, row-major; BYTES elements
    each preceded by their 4-byte length), BYTES as an array of ``str``."""
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=_dtype(datatype)).reshape(shape).copy()
    elements, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return np.array(elements, dtype=str).reshape(shape)


def tensor_from_data(datatype: str, shape: Sequence[int], data: list[Any]) -> np.ndarray:
    """An output tensor sent as JSON ``data`` (a flat list)."""
    dtype = np.dtype(str) if datatype == "BYTES" else _dtype(datatype)
    return np.array(data, dtype=dtype).reshape(shape)


def parameters(draws: int | None, return_members: bool) -> dict[str, int | bool]:
    """The request parameters espro reads."""
    values: dict[str, int | bool] = {"return_members": return_members}
    if draws is not None:
        values["draws"] = draws
    return values


def prediction(
    tensors: Mapping[str, np.ndarray],
    model_name: str,
    model_version: str,
    bundle_sha256: str | None = None,
) -> Prediction:
    """The prediction in a classification model's output tensors; espro servers name the
    bundle in the response parameter ``bundle_sha256``."""
    if "probabilities" not in tensors:
        raise EsproError(
            f"model {model_name!r} answered {', '.join(tensors)}: "
            "espro_client supports classification models only"
        )
    return Prediction(
        probabilities=tensors["probabilities"],
        labels=tensors["label"],
        confidence=tensors["confidence"],
        entropy=tensors["entropy"],
        expected_entropy=tensors["expected_entropy"],
        mutual_information=tensors["mutual_information"],
        disagreement=tensors["disagreement"],
        model_name=model_name,
        model_version=model_version,
        bundle_sha256=bundle_sha256,
        class_names=tensors.get("class_name"),
        prediction_sets=tensors.get("prediction_set"),
        abstain=tensors.get("abstain"),
        member_probabilities=tensors.get("member_probabilities"),
    )
