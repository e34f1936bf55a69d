"""Open Inference Protocol v2: the data model and codecs behind the ``/v2`` REST and gRPC doors.

One implementation for both transports. REST JSON, REST with the binary-tensor extension and
gRPC (typed ``contents`` or ``raw_input_contents``) all decode to ``{name: np.ndarray}``
through the same checks, and encode from it. A request the protocol refuses raises
:class:`~serving.errors.ServiceError` with an HTTP status (400: malformed) and a message naming
the input and the problem. Nothing here imports Ray or needs a server.

Binary layout, for the REST extension and gRPC raw contents alike: numeric tensors are
little-endian and row-major; a BYTES tensor is its elements in order, each a 4-byte
little-endian length followed by that many bytes. BYTES arrays are ``object`` arrays of
``bytes`` (``str`` elements are accepted on output and sent as UTF-8).

A server answers an inference request in this order: decode (``decode_rest_request`` or
``decode_grpc_request``), read the options (``request_options``), pick the outputs
(``select_outputs``, and ``binary_outputs`` for REST), predict, encode.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from serving.errors import JSONError, ServiceError, describe_validation_error
from serving.jsonarray import JSONArray, Path, read_json
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.quoting import quote

ParameterValue = StrictBool | StrictInt | StrictFloat | StrictStr
"""A request, tensor or response parameter: OIP allows booleans, numbers and strings."""
Parameters = dict[str, ParameterValue]


INTERNAL_ERROR = "internal error; the server log has the details"
"""What espro answers (500, gRPC INTERNAL) when it fails unexpectedly. Clients tell it from
Serve's proxy failing a request whose replica died, which they retry."""


# --------------------------------------------------------------------------- data model


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Model):
    """One input tensor: ``data`` in JSON (flat or nested lists), or binary extension bytes.

    Read from a body, ``data`` is a :class:`~serving.jsonarray.JSONArray` when it is an array
    of numbers (or ``true``/``false``/``null``), plain JSON values otherwise (strings)."""

    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: Parameters | None = None
    data: Any = None


class RequestOutput(_Model):
    """An output the client asks for; ``parameters.binary_data`` asks for it in binary."""

    name: StrictStr
    parameters: Parameters | None = None


class InferenceRequest(_Model):
    """The JSON part of a REST inference request."""

    id: StrictStr | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] = Field(default_factory=list)


class ResponseOutput(_Model):
    """One output tensor: flat ``data``, or ``parameters.binary_data_size`` bytes after the JSON."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(_Model):
    """The JSON part of a REST inference response."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Model):
    """A model input or output; ``-1`` marks a dimension of any size."""

    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(_Model):
    """``GET /v2``: server name, version and supported protocol extensions."""

    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)

    def to_grpc(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.model_dump())


class ModelMetadata(_Model):
    """``GET /v2/models/{name}``: a model's versions, platform and tensor signatures."""

    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]

    def to_grpc(self) -> pb.ModelMetadataResponse:
        return pb.ModelMetadataResponse(**self.model_dump())


# --------------------------------------------------------------------------- datatypes

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DATATYPES = tuple(_DTYPES)
"""The OIP datatypes espro reads and writes (not BF16)."""

_DATATYPE_OF = {(d.kind, d.itemsize): name for name, d in _DTYPES.items() if name != "BYTES"}


def numpy_dtype(datatype: str) -> np.dtype:
    """The little-endian numpy dtype of an OIP datatype; BYTES is ``object`` (of ``bytes``)."""
    try:
        return _DTYPES[datatype]
    except KeyError:
        raise ServiceError(
            400, f"unsupported datatype {quote(datatype)}; expected one of {', '.join(DATATYPES)}"
        ) from None


def oip_datatype(dtype: np.dtype) -> str:
    """The OIP datatype of a numpy dtype: ``object``, ``bytes`` and ``str`` arrays are BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE_OF[dtype.kind, dtype.itemsize]
    except KeyError:
        raise ServiceError(500, f"numpy dtype {dtype} has no OIP datatype") from None


# --------------------------------------------------------------------------- tensors in


@dataclass(frozen=True)
class _Spec:
    """A checked tensor header: known datatype, non-negative shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"input {quote(self.name)}"

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.datatype]

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def _spec(name: str, datatype: str, shape: Sequence[int]) -> _Spec:
    spec = _Spec(name, datatype, tuple(shape))
    try:
        numpy_dtype(datatype)
    except ServiceError as err:
        raise ServiceError(400, f"{spec.label}: {err.message}") from None
    # numpy cannot even build an empty array past these, so refuse them here with a 400
    if len(shape) > _MAX_RANK:
        raise ServiceError(
            400, f"{spec.label}: shape has {len(shape)} dimensions, over {_MAX_RANK}"
        )
    if any(d < 0 for d in shape):
        raise ServiceError(
            400, f"{spec.label}: shape {quote(list(shape))} has a negative dimension"
        )
    if math.prod(d for d in shape if d) * _DTYPES[datatype].itemsize > _MAX_BYTES:
        raise ServiceError(
            400, f"{spec.label}: shape {quote(list(shape))} is too large for any array"
        )
    return spec


_MAX_RANK = 32
"""The most dimensions an input may have (numpy allows 64; OIP clients use a handful)."""
_MAX_BYTES = np.iinfo(np.intp).max


_INTEGERS, _NUMBERS = frozenset({int}), frozenset({int, float})
_VALUE_TYPES = {
    "BOOL": (frozenset({bool}), "true/false"),
    "BYTES": (frozenset({str, bytes}), "strings"),
    **{t: (_INTEGERS, "integers") for t in DATATYPES if t.startswith(("INT", "UINT"))},
    **{t: (_NUMBERS, "numbers") for t in DATATYPES if t.startswith("FP")},
}


def _from_values(spec: _Spec, values: list[Any]) -> np.ndarray:
    """A flat list of Python values (JSON ``data`` or gRPC typed contents) as an array."""
    _check_count(spec, len(values))
    return _typed_array(spec, values).reshape(spec.shape)


def _check_count(spec: _Spec, count: int) -> None:
    if count != spec.count:
        raise ServiceError(
            400, f"{spec.label}: shape {list(spec.shape)} holds {spec.count} values, got {count}"
        )


def _typed_array(spec: _Spec, values: list[Any], numbers: bool = False) -> np.ndarray:
    """Python values as a flat array of the spec's datatype, if they are of its kind and range;
    ``numbers``: they are known to be ints and floats."""
    allowed, kind = _VALUE_TYPES[spec.datatype]
    found = allowed if numbers and allowed >= _NUMBERS else set(map(type, values))
    if not found <= allowed:
        wrong = ", ".join(sorted(t.__name__ for t in found - allowed))
        raise ServiceError(400, f"{spec.label}: {spec.datatype} data must be {kind}, got {wrong}")
    if spec.datatype == "BYTES":
        return _object_array([v.encode() if isinstance(v, str) else v for v in values])
    if spec.dtype.kind in "iu" and values:
        info = np.iinfo(spec.dtype)
        low, high = min(values), max(values)
        if low < info.min or high > info.max:
            bad = quote(low if low < info.min else high)
            raise ServiceError(
                400,
                f"{spec.label}: {bad} is out of range for {spec.datatype} [{info.min}, {info.max}]",
            )
    try:
        return np.array(values, dtype=spec.dtype)
    except OverflowError:
        raise ServiceError(
            400, f"{spec.label}: a value is out of range for {spec.datatype}"
        ) from None


def _object_array(elements: list[bytes]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


def _from_bytes(spec: _Spec, raw: bytes | memoryview) -> np.ndarray:
    """Binary tensor data (REST extension or gRPC raw contents) as a writable array."""
    if spec.datatype == "BYTES":
        return _from_values(spec, _split_byte_elements(spec, raw))
    expected = spec.count * spec.dtype.itemsize
    if len(raw) != expected:
        raise ServiceError(
            400,
            f"{spec.label}: {len(raw)} bytes of data, but {spec.datatype} "
            f"{list(spec.shape)} takes {expected}",
        )
    if spec.datatype == "BOOL" and np.frombuffer(raw, np.uint8).max(initial=0) > 1:
        raise ServiceError(400, f"{spec.label}: BOOL bytes must be 0 or 1")
    return np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape).copy()


def _split_byte_elements(spec: _Spec, raw: bytes | memoryview) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ServiceError(400, f"{spec.label}: BYTES data ends inside a 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ServiceError(
                400,
                f"{spec.label}: BYTES element {len(elements)} claims {size} bytes, "
                f"but {len(raw) - offset} remain",
            )
        elements.append(bytes(raw[offset : offset + size]))
        offset += size
    return elements


def _from_json(spec: _Spec, data: Any) -> np.ndarray:
    """JSON ``data``: flat, or nested to match the shape exactly."""
    if not isinstance(data, JSONArray):  # strings or objects, or not a list at all
        return _from_values(spec, _flatten(spec, data))
    if len(data.shape) == 1:
        _check_count(spec, len(data))
    elif data.shape != spec.shape:
        _refuse_nesting(spec, data.shape)
    convert = functools.partial(_typed_array, spec, numbers=data.plain)
    return data.to_numpy(spec.dtype, convert).reshape(spec.shape)


def _refuse_nesting(spec: _Spec, shape: tuple[int, ...]) -> None:
    shown = list(spec.shape)
    if not spec.shape:
        raise ServiceError(400, f"{spec.label}: nested data for a scalar (shape [])")
    if len(shape) > len(spec.shape):
        raise ServiceError(400, f"{spec.label}: nested data is deeper than shape {shown}")
    raise ServiceError(400, f"{spec.label}: nested data does not match shape {shown}")


def _flatten(spec: _Spec, data: Any) -> list[Any]:
    """JSON ``data`` read as plain values: a flat list, or nested lists that match the shape
    exactly (the checks :func:`_from_json` makes on arrays of numbers)."""
    if not isinstance(data, list):
        raise ServiceError(400, f"{spec.label}: data must be a list, got {type(data).__name__}")
    if list not in set(map(type, data)):  # a third of the time of any(isinstance(...))
        return data
    if not spec.shape:
        raise ServiceError(400, f"{spec.label}: nested data for a scalar (shape [])")
    flat: list[Any] = []

    def walk(node: Any, depth: int) -> None:
        if not isinstance(node, list) or len(node) != spec.shape[depth]:
            raise ServiceError(
                400, f"{spec.label}: nested data does not match shape {list(spec.shape)}"
            )
        if depth < len(spec.shape) - 1:
            for child in node:
                walk(child, depth + 1)
        elif any(isinstance(v, list) for v in node):
            raise ServiceError(
                400, f"{spec.label}: nested data is deeper than shape {list(spec.shape)}"
            )
        else:
            flat.extend(node)

    walk(data, 0)
    return flat


def _check_unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ServiceError(400, f"{what} {quote(name)} appears more than once")
        seen.add(name)


def _refuse_extensions(label: str, parameters: Iterable[str]) -> None:
    """Tensor parameters of protocol extensions espro does not implement."""
    for key in parameters:
        if key.startswith("shared_memory_"):
            raise ServiceError(
                400, f"{label}: the shared-memory extension is not supported ({quote(key)})"
            )
        if key == "classification":
            raise ServiceError(400, f"{label}: the classification extension is not supported")


def _check_requested_outputs(outputs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    _check_unique((name for name, _ in outputs), "requested output")
    for name, parameters in outputs:
        _refuse_extensions(f"output {quote(name)}", parameters)
        _bool_parameter(parameters, "binary_data", False, where=f"output {quote(name)}: ")


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class RequestOptions:
    """What a request's parameters ask of the predictor."""

    draws: int | None = None
    """Draws per simplex to use; ``None``: every draw."""
    return_members: bool = False
    """Whether to return each member's probabilities as well."""


def _bool_parameter(
    parameters: Mapping[str, Any], key: str, default: bool, where: str = ""
) -> bool:
    value = parameters.get(key, default)
    if type(value) is not bool:
        raise ServiceError(
            400, f"{where}parameter {key!r} must be true or false, got {quote(value)}"
        )
    return value


def request_options(parameters: Mapping[str, Any] | None) -> RequestOptions:
    """``draws`` (a positive integer) and ``return_members`` (a boolean) from request
    parameters, REST or gRPC (see :func:`grpc_parameters`); other parameters are ignored."""
    parameters = parameters or {}
    draws = parameters.get("draws")
    if draws is not None and (type(draws) is not int or draws < 1):
        raise ServiceError(400, f"parameter 'draws' must be a positive integer, got {quote(draws)}")
    return RequestOptions(draws, _bool_parameter(parameters, "return_members", False))


def grpc_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A gRPC parameter map as plain Python values, like REST parameters."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise ServiceError(400, f"parameter {quote(key)} has no value")
        values[key] = getattr(parameter, choice)
    return values


def binary_outputs(request: InferenceRequest) -> set[str] | bool:
    """Which outputs a REST response sends in binary: all (``True``), none, or those named.

    ``parameters.binary_data`` of a requested output overrides the request's
    ``binary_data_output`` (tritonclient sets the latter when it requests no outputs).
    """
    default = _bool_parameter(request.parameters or {}, "binary_data_output", False)
    if not request.outputs:
        return default
    return {
        output.name
        for output in request.outputs
        if _bool_parameter(
            output.parameters or {}, "binary_data", default, f"output {quote(output.name)}: "
        )
    }


def select_outputs(
    tensors: Mapping[str, np.ndarray], requested: Sequence[str]
) -> dict[str, np.ndarray]:
    """The requested outputs in the order asked for; all of them when none are named."""
    if not requested:
        return dict(tensors)
    unknown = [name for name in requested if name not in tensors]
    if unknown:
        raise ServiceError(
            400,
            f"unknown output {quote(unknown[0])}; the outputs are {', '.join(map(repr, tensors))}",
        )
    return {name: tensors[name] for name in requested}


# --------------------------------------------------------------------------- REST


def decode_rest_request(
    body: bytes, header_length: int | None = None
) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """Parse a REST inference request body into the request and its input arrays.

    ``header_length`` is the ``Inference-Header-Content-Length`` header: the body's first
    ``header_length`` bytes are JSON and the inputs with ``parameters.binary_data_size``
    take their bytes, in input order, from the rest, which they must use up exactly.
    """
    if header_length is not None and not 0 <= header_length <= len(body):
        raise ServiceError(
            400,
            f"Inference-Header-Content-Length must lie in [0, {len(body)}] (the body's size), "
            f"got {header_length}",
        )
    split = len(body) if header_length is None else header_length
    request = _parse_request(body[:split])
    _check_unique((t.name for t in request.inputs), "input")
    _check_requested_outputs([(o.name, o.parameters or {}) for o in request.outputs])
    _bool_parameter(request.parameters or {}, "binary_data_output", False)
    binary = memoryview(body)[split:]
    arrays, offset = {}, 0
    for tensor in request.inputs:
        spec = _spec(tensor.name, tensor.datatype, tensor.shape)
        parameters = tensor.parameters or {}
        _refuse_extensions(spec.label, parameters)
        size = _binary_size(spec, parameters)
        if size is None:
            if tensor.data is None:
                raise ServiceError(400, f"{spec.label}: no data and no parameters.binary_data_size")
            arrays[spec.name] = _from_json(spec, tensor.data)
            continue
        if tensor.data is not None:
            raise ServiceError(400, f"{spec.label}: both data and parameters.binary_data_size")
        if offset + size > len(binary):
            hint = "" if header_length is not None else " (no Inference-Header-Content-Length)"
            raise ServiceError(
                400,
                f"{spec.label}: binary_data_size {size} runs past the end of the body: "
                f"{len(binary) - offset} binary bytes left{hint}",
            )
        arrays[spec.name] = _from_bytes(spec, binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise ServiceError(
            400, f"{len(binary) - offset} bytes after the JSON header belong to no input"
        )
    return request, arrays


def _parse_request(text: bytes) -> InferenceRequest:
    """The JSON header, each tensor's ``data`` read by :func:`~serving.jsonarray.read_json`."""
    try:
        document = read_json(text, _data_rank, any_elements=True, long_strings=_is_data)
        return InferenceRequest.model_validate(document)
    except JSONError as err:
        raise ServiceError(err.status, f"invalid inference request: {err}") from None
    except ValidationError as err:
        raise ServiceError(
            400, f"invalid inference request: {describe_validation_error(err)}"
        ) from err


def _data_rank(path: Path) -> int | None:
    """``inputs[i].data`` is an array of numbers of at most :data:`_MAX_RANK` dimensions."""
    return _MAX_RANK if _is_data(path) else None


def _is_data(path: Path) -> bool:
    """Whether ``path`` is an input's ``data``, whose BYTES elements may be long (images)."""
    return len(path) == 3 and path[0] == "inputs" and path[2] == "data"


def _binary_size(spec: _Spec, parameters: Mapping[str, Any]) -> int | None:
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise ServiceError(
            400,
            f"{spec.label}: binary_data_size must be a non-negative integer, got {quote(size)}",
        )
    return size


def encode_rest_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    tensors: Mapping[str, np.ndarray],
    binary: set[str] | bool = False,
    parameters: Mapping[str, str] | None = None,
) -> tuple[bytes, int | None]:
    """A REST inference response body and its ``Inference-Header-Content-Length``.

    Outputs in ``binary`` (all when ``True``) follow the JSON header as raw bytes; the length
    is ``None`` when every output is in the JSON, and the body is then plain JSON.
    ``parameters`` become the response's parameters.
    """
    outputs, chunks = [], []
    for name, array in tensors.items():
        header = {"name": name, "shape": list(array.shape), "datatype": oip_datatype(array.dtype)}
        if binary if isinstance(binary, bool) else name in binary:
            chunks.append(tensor_bytes(array))
            size = {"binary_data_size": len(chunks[-1])}
            outputs.append(ResponseOutput(**header, parameters=size))
        else:
            outputs.append(ResponseOutput(**header, data=_json_data(array)))
    response = InferenceResponse(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        parameters=dict(parameters) if parameters else None,
        outputs=outputs,
    )
    json_header = response.model_dump_json(exclude_none=True).encode()
    if not chunks:
        return json_header, None
    return b"".join([json_header, *chunks]), len(json_header)


def tensor_bytes(array: np.ndarray) -> bytes:
    """An output array in the binary layout (little-endian; length-prefixed for BYTES)."""
    if oip_datatype(array.dtype) == "BYTES":
        elements = [_element_bytes(v) for v in array.ravel()]
        return b"".join(struct.pack("<I", len(e)) + e for e in elements)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _element_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise ServiceError(500, f"BYTES outputs must hold bytes or str, got {type(value).__name__}")


def _json_data(array: np.ndarray) -> list[Any]:
    if oip_datatype(array.dtype) != "BYTES":
        return array.ravel().tolist()
    try:
        return [_element_bytes(v).decode() for v in array.ravel()]
    except UnicodeDecodeError:
        raise ServiceError(
            500, "a BYTES output is not UTF-8; it can only be sent in binary"
        ) from None


# --------------------------------------------------------------------------- gRPC

_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Where each datatype's typed values go; FP16 has no typed field (raw contents only)."""


def decode_grpc_request(
    request: pb.ModelInferRequest,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The request parameters (plain values) and input arrays of a gRPC ``ModelInferRequest``.

    Inputs come either all from ``raw_input_contents`` (one entry per input, in order) or all
    from their typed ``contents``.
    """
    parameters = grpc_parameters(request.parameters)
    _check_unique((t.name for t in request.inputs), "input")
    _check_requested_outputs([(o.name, grpc_parameters(o.parameters)) for o in request.outputs])
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ServiceError(
            400,
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send every input raw or none",
        )
    arrays = {}
    for i, tensor in enumerate(request.inputs):
        spec = _spec(tensor.name, tensor.datatype, tensor.shape)
        _refuse_extensions(spec.label, tensor.parameters)
        values = _typed_values(spec, tensor.contents)
        if raw and values is not None:
            raise ServiceError(400, f"{spec.label}: both contents and raw_input_contents")
        if raw:
            arrays[spec.name] = _from_bytes(spec, raw[i])
        elif values is None and spec.count:
            raise ServiceError(400, f"{spec.label}: no contents and no raw_input_contents")
        else:
            arrays[spec.name] = _from_values(spec, values or [])
    return parameters, arrays


def _typed_values(spec: _Spec, contents: pb.InferTensorContents) -> list[Any] | None:
    """The values in the one typed field that fits the datatype; ``None`` when none is set."""
    populated = [field.name for field, _ in contents.ListFields()]
    if not populated:
        return None
    expected = _CONTENTS_FIELD.get(spec.datatype)
    if expected is None:
        raise ServiceError(
            400, f"{spec.label}: {spec.datatype} can only be sent in raw_input_contents"
        )
    if populated != [expected]:
        raise ServiceError(
            400,
            f"{spec.label}: {spec.datatype} values belong in contents.{expected}, "
            f"got {', '.join(populated)}",
        )
    return list(getattr(contents, expected))


def encode_grpc_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    tensors: Mapping[str, np.ndarray],
    parameters: Mapping[str, str] | None = None,
) -> pb.ModelInferResponse:
    """A gRPC ``ModelInferResponse`` carrying every tensor in ``raw_output_contents``, and
    ``parameters`` as string parameters."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version or "", id=request_id or ""
    )
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
    for name, array in tensors.items():
        response.outputs.add(name=name, datatype=oip_datatype(array.dtype), shape=array.shape)
        response.raw_output_contents.append(tensor_bytes(array))
    return response
