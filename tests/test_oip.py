"""The OIP v2 codecs against the real clients: requests built by tritonclient decode to the
arrays that went in, and our responses decode in tritonclient to the arrays we sent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request as triton_grpc_request

from serving import oip
from serving.errors import ServiceError
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc

NUMERIC = [t for t in oip.DATATYPES if t != "BYTES"]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Values that exercise a datatype: its extremes for integers, signs and fractions."""
    count = int(np.prod(shape))
    if datatype == "BYTES":
        words = [b"", b"cat", "\u00fcber".encode(), b"x" * 300, b"dog", b"bird"]
        return np.array((words * count)[:count], dtype=object).reshape(shape)
    dtype = oip.numpy_dtype(datatype)
    if dtype.kind == "b":
        values = np.arange(count) % 2 == 0
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.resize(np.array([info.min, info.max, 0, 1, info.max - 1], dtype=dtype), count)
    else:
        values = np.resize(np.array([-1.5, 0.0, 0.25, 1e3, -3.0], dtype=dtype), count)
    return values.astype(dtype).reshape(shape)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == object:
        as_bytes = [v.encode() if isinstance(v, str) else v for v in actual.ravel()]
        assert as_bytes == list(expected.ravel())
    else:
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def rest_body(request: dict, binary: bytes = b"") -> tuple[bytes, int | None]:
    header = json.dumps(request).encode()
    return header + binary, (len(header) if binary else None)


def fp32_input(**fields) -> dict:
    return {"name": "x", "shape": [2, 2], "datatype": "FP32", **fields}


def expect_error(fn, *args, match: str, status: int = 400) -> ServiceError:
    with pytest.raises(ServiceError, match=match) as info:
        fn(*args)
    assert info.value.status == status
    return info.value


# --------------------------------------------------------------------------- protocol files


def _fields(message) -> dict:
    return {
        f.name: (f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name)
        for f in message.fields
    }


def _messages(file_descriptor):
    stack = list(file_descriptor.message_types_by_name.values())
    while stack:
        message = stack.pop()
        stack.extend(message.nested_types)
        yield message


def test_messages_match_tritonclients_proto():
    ours = list(_messages(pb.DESCRIPTOR))
    assert len(ours) > 20
    for message in ours:
        theirs = triton_pb.DESCRIPTOR.pool.FindMessageTypeByName(message.full_name)
        assert _fields(message) == _fields(theirs), message.full_name
        assert [o.name for o in message.oneofs] == [o.name for o in theirs.oneofs]


def test_service_matches_tritonclients_proto():
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService" == theirs.full_name
    for method in ours.methods:
        twin = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == twin.input_type.full_name
        assert method.output_type.full_name == twin.output_type.full_name
    assert {m.name for m in ours.methods} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }
    assert hasattr(pb_grpc, "add_GRPCInferenceServiceServicer_to_server")


def test_checked_in_modules_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    from serving.proto.generate import MESSAGES, ROOT, generate

    generate(tmp_path)
    for fresh in (tmp_path / MESSAGES.parent).iterdir():
        assert fresh.read_text() == (ROOT / MESSAGES.parent / fresh.name).read_text(), fresh.name


@pytest.mark.parametrize(
    "imports",
    [
        "serving.proto.grpc_predict_v2_pb2_grpc, tritonclient.grpc",
        "tritonclient.grpc, serving.proto.grpc_predict_v2_pb2_grpc",
    ],
)
def test_our_proto_and_tritonclients_load_in_either_order(imports):
    code = f"import {imports}\nfrom serving.proto.grpc_predict_v2_pb2 import ModelInferRequest"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --------------------------------------------------------------------------- datatypes


@pytest.mark.parametrize("datatype", oip.DATATYPES)
def test_datatype_mapping_round_trips(datatype):
    assert oip.oip_datatype(oip.numpy_dtype(datatype)) == datatype


def test_unknown_datatypes_are_refused():
    expect_error(oip.numpy_dtype, "BF16", match="unsupported datatype 'BF16'")
    expect_error(oip.oip_datatype, np.dtype(np.complex64), match="complex64", status=500)
    assert oip.oip_datatype(np.dtype("U3")) == "BYTES"
    assert oip.oip_datatype(np.dtype(">f4")) == "FP32"


# --------------------------------------------------------------------------- REST


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", oip.DATATYPES)
def test_rest_request_from_tritonclient_decodes(datatype, binary):
    x, scalar = sample(datatype), sample(datatype, ())
    inputs = [
        thttp.InferInput("x", list(x.shape), datatype).set_data_from_numpy(x, binary),
        thttp.InferInput("s", [], datatype).set_data_from_numpy(scalar, binary),
    ]
    body, header_length = thttp.InferenceServerClient.generate_request_body(
        inputs, request_id="r1", parameters={"draws": 2}
    )
    assert (header_length is not None) == binary
    request, arrays = oip.decode_rest_request(body, header_length)
    assert list(arrays) == ["x", "s"]
    assert_same(arrays["x"], x)
    assert_same(arrays["s"], scalar)
    assert request.id == "r1"
    assert oip.request_options(request.parameters) == oip.RequestOptions(draws=2)
    assert arrays["x"].flags.writeable


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", oip.DATATYPES)
def test_rest_response_decodes_in_tritonclient(datatype, binary):
    y, empty = sample(datatype, (3, 2)), sample(datatype, (0, 4))
    body, header_length = oip.encode_rest_response("m", "1", "r1", {"y": y, "empty": empty}, binary)
    assert (header_length is not None) == binary
    result = thttp.InferResult.from_response_body(body, header_length=header_length)
    assert_same(result.as_numpy("y"), y)
    assert result.as_numpy("empty").shape == (0, 4)
    assert result.get_response()["model_version"] == "1"
    assert result.get_response()["id"] == "r1"


def test_rest_binary_outputs_follow_the_request():
    out = thttp.InferRequestedOutput
    inputs = [thttp.InferInput("x", [1], "FP32").set_data_from_numpy(np.ones(1, np.float32))]

    def chosen(outputs, **kwargs):
        body, length = thttp.InferenceServerClient.generate_request_body(inputs, outputs, **kwargs)
        return oip.binary_outputs(oip.decode_rest_request(body, length)[0])

    assert chosen(None) is True  # tritonclient asks for binary_data_output when naming none
    assert chosen([out("a", binary_data=True), out("b", binary_data=False)]) == {"a"}
    request = oip.InferenceRequest(
        inputs=[], parameters={"binary_data_output": True}, outputs=[{"name": "a"}]
    )
    assert oip.binary_outputs(request) == {"a"}
    mixed, length = oip.encode_rest_response("m", None, None, sample_pair(), {"probs"})
    result = thttp.InferResult.from_response_body(mixed, header_length=length)
    assert "data" in result.get_output("labels")
    assert "binary_data_size" in result.get_output("probs")["parameters"]
    assert_same(result.as_numpy("labels"), sample_pair()["labels"])


def sample_pair() -> dict[str, np.ndarray]:
    return {"probs": sample("FP32"), "labels": sample("INT64", (2,))}


def test_rest_nested_data_is_accepted():
    body, _ = rest_body({"inputs": [fp32_input(data=[[1, 2.5], [3, 4]])]})
    _, arrays = oip.decode_rest_request(body)
    np.testing.assert_array_equal(arrays["x"], np.array([[1, 2.5], [3, 4]], np.float32))


def test_select_outputs():
    tensors = {"a": np.zeros(1), "b": np.ones(1), "c": np.ones(2)}
    assert list(oip.select_outputs(tensors, [])) == ["a", "b", "c"]
    assert list(oip.select_outputs(tensors, ["c", "a"])) == ["c", "a"]
    expect_error(oip.select_outputs, tensors, ["a", "z"], match="unknown output 'z'")


def _binary(*inputs: tuple[dict, bytes], header: int | None = None) -> tuple[bytes, int]:
    head = json.dumps({"inputs": [i for i, _ in inputs]}).encode()
    return head + b"".join(b for _, b in inputs), len(head) if header is None else header


FLOATS = np.arange(4, dtype="<f4").tobytes()

REST_MALFORMED = {
    "not json": ((b"{inputs", None), "invalid inference request: the body is not valid JSON"),
    "no inputs": (rest_body({"outputs": []}), "inputs: Field required"),
    "unknown field": (rest_body({"inputs": [], "input": []}), "Extra inputs are not permitted"),
    "shape of strings": (
        rest_body({"inputs": [fp32_input(shape=["2"], data=[1, 2])]}),
        r"inputs.0.shape.0",
    ),
    "unknown datatype": (
        rest_body({"inputs": [fp32_input(datatype="BF16", data=[1] * 4)]}),
        "input 'x': unsupported datatype 'BF16'",
    ),
    "negative dimension": (
        rest_body({"inputs": [fp32_input(shape=[-2, -2], data=[1] * 4)]}),
        "negative dimension",
    ),
    "too many values": (
        rest_body({"inputs": [fp32_input(data=[1] * 5)]}),
        r"input 'x': shape \[2, 2\] holds 4 values, got 5",
    ),
    "too few values": (rest_body({"inputs": [fp32_input(data=[1] * 3)]}), "holds 4 values, got 3"),
    "ragged nesting": (
        rest_body({"inputs": [fp32_input(data=[[1, 2], [3]])]}),
        r"inputs.0.data must be a rectangular array of numbers \(nested lists of equal lengths\)",
    ),
    "nesting against the shape": (
        rest_body({"inputs": [fp32_input(data=[[1], [2], [3], [4]])]}),
        "nested data does not match shape",
    ),
    "too deep": (
        rest_body({"inputs": [fp32_input(data=[[[1], [2]], [[3], [4]]])]}),
        "deeper than shape",
    ),
    "lists and scalars": (
        rest_body({"inputs": [fp32_input(data=[[1, 2], 3, 4])]}),
        "inputs.0.data must be a rectangular array",
    ),
    "nested scalar": (
        rest_body({"inputs": [fp32_input(shape=[], data=[[1]])]}),
        "nested data for a scalar",
    ),
    "data not a list": (rest_body({"inputs": [fp32_input(data=1.0)]}), "data must be a list"),
    "strings for numbers": (
        rest_body({"inputs": [fp32_input(data=["1", 2, 3, 4])]}),
        "FP32 data must be numbers, got str",
    ),
    "nulls": (rest_body({"inputs": [fp32_input(data=[None] * 4)]}), "got NoneType"),
    "objects": (rest_body({"inputs": [fp32_input(data=[{}] * 4)]}), "got dict"),
    "booleans for numbers": (
        rest_body({"inputs": [fp32_input(data=[True, 1, 2, 3])]}),
        "must be numbers, got bool",
    ),
    "floats for integers": (
        rest_body({"inputs": [fp32_input(datatype="INT32", data=[1.5, 1, 2, 3])]}),
        "INT32 data must be integers, got float",
    ),
    "numbers for booleans": (
        rest_body({"inputs": [fp32_input(datatype="BOOL", data=[1, 0, 1, 0])]}),
        "BOOL data must be true/false, got int",
    ),
    "numbers for bytes": (
        rest_body({"inputs": [fp32_input(datatype="BYTES", data=[1, 0, 1, 0])]}),
        "BYTES data must be strings",
    ),
    "integer out of range": (
        rest_body({"inputs": [fp32_input(datatype="INT8", data=[1, 2, 3, 128])]}),
        r"128 is out of range for INT8 \[-128, 127\]",
    ),
    "negative unsigned": (
        rest_body({"inputs": [fp32_input(datatype="UINT64", data=[-1, 2, 3, 4])]}),
        "-1 is out of range for UINT64",
    ),
    "huge float": (
        rest_body({"inputs": [fp32_input(datatype="FP64", data=[10**400, 1, 2, 3])]}),
        "out of range for FP64",
    ),
    "duplicate inputs": (
        rest_body({"inputs": [fp32_input(data=[1] * 4), fp32_input(data=[1] * 4)]}),
        "input 'x' appears more than once",
    ),
    "duplicate outputs": (
        rest_body({"inputs": [], "outputs": [{"name": "a"}, {"name": "a"}]}),
        "requested output 'a' appears more than once",
    ),
    "no data": (rest_body({"inputs": [fp32_input()]}), "input 'x': no data"),
    "data and binary": (
        _binary((fp32_input(data=[1] * 4, parameters={"binary_data_size": 16}), FLOATS)),
        "both data and parameters.binary_data_size",
    ),
    "binary size too long": (
        _binary((fp32_input(parameters={"binary_data_size": 20}), FLOATS)),
        "binary_data_size 20 runs past the end of the body: 16 binary bytes left",
    ),
    "binary size short of the shape": (
        _binary((fp32_input(parameters={"binary_data_size": 12}), FLOATS[:12])),
        r"12 bytes of data, but FP32 \[2, 2\] takes 16",
    ),
    "binary size long for the shape": (
        _binary((fp32_input(parameters={"binary_data_size": 20}), FLOATS + b"\0" * 4)),
        "20 bytes of data, but FP32",
    ),
    "trailing bytes": (
        _binary((fp32_input(parameters={"binary_data_size": 16}), FLOATS + b"junk")),
        "4 bytes after the JSON header belong to no input",
    ),
    "negative binary size": (
        _binary((fp32_input(parameters={"binary_data_size": -16}), FLOATS)),
        "binary_data_size must be a non-negative integer, got -16",
    ),
    "binary size as a string": (
        _binary((fp32_input(parameters={"binary_data_size": "16"}), FLOATS)),
        "binary_data_size must be a non-negative integer, got '16'",
    ),
    "binary without the header length": (
        (
            _binary((fp32_input(parameters={"binary_data_size": 16}), b""))[0] + FLOATS,
            None,
        ),
        "invalid inference request",  # the bytes after the JSON make it invalid JSON
    ),
    "binary size with no binary part": (
        rest_body({"inputs": [fp32_input(parameters={"binary_data_size": 16})]}),
        r"runs past the end .* \(no Inference-Header-Content-Length\)",
    ),
    "header length past the body": (
        _binary((fp32_input(data=[1] * 4), b""), header=1000),
        r"Content-Length must lie in \[0, 86\] \(the body's size\), got 1000",
    ),
    "negative header length": (
        _binary((fp32_input(data=[1] * 4), b""), header=-1),
        "Inference-Header-Content-Length must lie in .*, got -1",
    ),
    "header length cutting the json": (
        _binary((fp32_input(data=[1] * 4), b""), header=10),
        "invalid inference request",
    ),
    "bytes prefix cut short": (
        _binary(
            (
                {"name": "s", "shape": [1], "datatype": "BYTES"}
                | {"parameters": {"binary_data_size": 2}},
                b"\x01\x00",
            )
        ),
        "input 's': BYTES data ends inside a 4-byte length prefix",
    ),
    "bytes element overrun": (
        _binary(
            (
                {
                    "name": "s",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 6},
                },
                b"\x05\x00\x00\x00ab",
            )
        ),
        "BYTES element 0 claims 5 bytes, but 2 remain",
    ),
    "bytes element count": (
        _binary(
            (
                {
                    "name": "s",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 6},
                },
                b"\x02\x00\x00\x00ab",
            )
        ),
        r"input 's': shape \[2\] holds 2 values, got 1",
    ),
    "bool bytes": (
        _binary(
            (
                {
                    "name": "b",
                    "shape": [2],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 2},
                },
                b"\x01\x02",
            )
        ),
        "BOOL bytes must be 0 or 1",
    ),
    "shared memory": (
        rest_body({"inputs": [fp32_input(parameters={"shared_memory_region": "r"})]}),
        "shared-memory extension is not supported",
    ),
    "classification": (
        rest_body({"inputs": [], "outputs": [{"name": "p", "parameters": {"classification": 2}}]}),
        "output 'p': the classification extension is not supported",
    ),
    "binary_data not a bool": (
        rest_body({"inputs": [], "outputs": [{"name": "p", "parameters": {"binary_data": 1}}]}),
        "output 'p': parameter 'binary_data' must be true or false, got 1",
    ),
    "binary_data_output not a bool": (
        rest_body({"inputs": [], "parameters": {"binary_data_output": "yes"}}),
        "parameter 'binary_data_output' must be true or false, got 'yes'",
    ),
    "parameter of a nested object": (
        rest_body({"inputs": [], "parameters": {"draws": {"n": 1}}}),
        "parameters.draws",
    ),
}


@pytest.mark.parametrize("case", REST_MALFORMED)
def test_malformed_rest_requests_are_400(case):
    (body, header_length), match = REST_MALFORMED[case]
    expect_error(oip.decode_rest_request, body, header_length, match=match)


def test_binary_request_with_json_and_binary_inputs_mixed():
    body, length = _binary(
        ({"name": "a", "shape": [1], "datatype": "INT8", "data": [7]}, b""),
        (fp32_input(parameters={"binary_data_size": 16}), FLOATS),
        (
            {"name": "s", "shape": [0], "datatype": "BYTES", "parameters": {"binary_data_size": 0}},
            b"",
        ),
    )
    _, arrays = oip.decode_rest_request(body, length)
    assert arrays["a"].tolist() == [7]
    np.testing.assert_array_equal(arrays["x"], np.arange(4, dtype=np.float32).reshape(2, 2))
    assert arrays["s"].shape == (0,)


def test_non_utf8_bytes_only_go_out_in_binary():
    tensors = {"s": np.array([b"\xff"], dtype=object)}
    expect_error(
        oip.encode_rest_response, "m", None, None, tensors, False, match="UTF-8", status=500
    )
    body, length = oip.encode_rest_response("m", None, None, tensors, True)
    assert (
        thttp.InferResult.from_response_body(body, header_length=length).as_numpy("s")[0] == b"\xff"
    )


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (None, oip.RequestOptions()),
        ({"draws": 3, "return_members": True, "other": "x"}, oip.RequestOptions(3, True)),
    ],
)
def test_request_options(parameters, expected):
    assert oip.request_options(parameters) == expected


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"draws": 0}, "'draws' must be a positive integer, got 0"),
        ({"draws": -1}, "got -1"),
        ({"draws": 2.0}, "got 2.0"),
        ({"draws": "2"}, "got '2'"),
        ({"draws": True}, "got True"),
        ({"return_members": 1}, "'return_members' must be true or false, got 1"),
        ({"return_members": "yes"}, "got 'yes'"),
    ],
)
def test_bad_request_options_are_400(parameters, match):
    expect_error(oip.request_options, parameters, match=match)


def test_grpc_parameters_read_like_rest_ones():
    request = tgrpc.service_pb2.ModelInferRequest()
    request.parameters["draws"].uint64_param = 4
    request.parameters["return_members"].bool_param = True
    request.parameters["scale"].double_param = 0.5
    ours = pb.ModelInferRequest.FromString(request.SerializeToString())
    values = oip.grpc_parameters(ours.parameters)
    assert values == {"draws": 4, "return_members": True, "scale": 0.5}
    assert oip.request_options(values) == oip.RequestOptions(4, True)
    ours.parameters["draws"].double_param = 4.0
    expect_error(oip.request_options, oip.grpc_parameters(ours.parameters), match="got 4.0")
    ours.parameters["empty"].Clear()
    expect_error(oip.grpc_parameters, ours.parameters, match="parameter 'empty' has no value")


# --------------------------------------------------------------------------- gRPC


def triton_request(inputs, outputs=None, parameters=None) -> pb.ModelInferRequest:
    """A request as tritonclient.grpc sends it, parsed by our generated message."""
    theirs = triton_grpc_request(
        "m", inputs, "1", "r1", outputs, 0, False, False, 0, None, parameters
    )
    return pb.ModelInferRequest.FromString(theirs.SerializeToString())


@pytest.mark.parametrize("datatype", oip.DATATYPES)
def test_grpc_request_from_tritonclient_decodes(datatype):
    x, scalar = sample(datatype), sample(datatype, ())
    inputs = [
        tgrpc.InferInput("x", list(x.shape), datatype).set_data_from_numpy(x),
        tgrpc.InferInput("s", [], datatype).set_data_from_numpy(scalar),
    ]
    request = triton_request(inputs, [tgrpc.InferRequestedOutput("y")], {"draws": 2})
    assert request.model_name == "m" and request.id == "r1"
    parameters, arrays = oip.decode_grpc_request(request)
    assert list(arrays) == ["x", "s"]
    assert_same(arrays["x"], x)
    assert_same(arrays["s"], scalar)
    assert oip.request_options(parameters) == oip.RequestOptions(draws=2)


@pytest.mark.parametrize("datatype", [t for t in oip.DATATYPES if t != "FP16"])
def test_grpc_typed_contents_decode(datatype):
    x = sample(datatype)
    field = oip._CONTENTS_FIELD[datatype]
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=x.shape)
    getattr(tensor.contents, field).extend(x.ravel().tolist())
    _, arrays = oip.decode_grpc_request(request)
    assert_same(arrays["x"], x)


@pytest.mark.parametrize("datatype", oip.DATATYPES)
def test_grpc_response_decodes_in_tritonclient(datatype):
    y = sample(datatype, (3, 2))
    ours = oip.encode_grpc_response("m", "1", "r1", {"y": y, "empty": sample(datatype, (0,))})
    theirs = triton_pb.ModelInferResponse.FromString(ours.SerializeToString())
    result = tgrpc.InferResult(theirs)
    assert_same(result.as_numpy("y"), y)
    assert result.as_numpy("empty").shape == (0,)
    assert (theirs.model_name, theirs.model_version, theirs.id) == ("m", "1", "r1")


def _grpc(*tensors: dict, raw: list[bytes] | None = None, **fields) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(inputs=list(tensors), raw_input_contents=raw or [], **fields)


def _fp32(**fields) -> dict:
    return {"name": "x", "datatype": "FP32", "shape": [2, 2], **fields}


GRPC_MALFORMED = {
    "raw count": (
        _grpc(_fp32(), _fp32(name="y"), raw=[FLOATS]),
        "raw_input_contents has 1 entries for 2 inputs",
    ),
    "raw and typed": (
        _grpc(_fp32(contents={"fp32_contents": [1, 2, 3, 4]}), raw=[FLOATS]),
        "input 'x': both contents and raw_input_contents",
    ),
    "no data": (_grpc(_fp32()), "input 'x': no contents and no raw_input_contents"),
    "wrong typed field": (
        _grpc(_fp32(contents={"int_contents": [1, 2, 3, 4]})),
        "FP32 values belong in contents.fp32_contents, got int_contents",
    ),
    "two typed fields": (
        _grpc(_fp32(contents={"fp32_contents": [1, 2, 3, 4], "fp64_contents": [1.0]})),
        "got fp32_contents, fp64_contents",
    ),
    "typed fp16": (
        _grpc(_fp32(datatype="FP16", contents={"fp32_contents": [1, 2, 3, 4]})),
        "FP16 can only be sent in raw_input_contents",
    ),
    "typed count": (
        _grpc(_fp32(contents={"fp32_contents": [1, 2, 3]})),
        r"shape \[2, 2\] holds 4 values, got 3",
    ),
    "typed int8 out of range": (
        _grpc(_fp32(datatype="INT8", contents={"int_contents": [1, 2, 3, 200]})),
        "200 is out of range for INT8",
    ),
    "raw size": (
        _grpc(_fp32(), raw=[FLOATS[:-1]]),
        r"15 bytes of data, but FP32 \[2, 2\] takes 16",
    ),
    "raw size long": (_grpc(_fp32(), raw=[FLOATS + b"\0"]), "17 bytes of data"),
    "duplicate inputs": (
        _grpc(_fp32(), _fp32(), raw=[FLOATS, FLOATS]),
        "input 'x' appears more than once",
    ),
    "unknown datatype": (
        _grpc(_fp32(datatype="BF16"), raw=[FLOATS]),
        "unsupported datatype 'BF16'",
    ),
    "negative dimension": (_grpc(_fp32(shape=[-1, 4]), raw=[FLOATS]), "negative dimension"),
    "shared memory": (
        _grpc(_fp32(parameters={"shared_memory_region": {"string_param": "r"}})),
        "shared-memory extension is not supported",
    ),
    "classification": (
        _grpc(outputs=[{"name": "p", "parameters": {"classification": {"int64_param": 2}}}]),
        "classification extension is not supported",
    ),
}


@pytest.mark.parametrize("case", GRPC_MALFORMED)
def test_malformed_grpc_requests_are_invalid_argument(case):
    request, match = GRPC_MALFORMED[case]
    error = expect_error(oip.decode_grpc_request, request, match=match)
    assert error.grpc_code is grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- metadata, errors


def test_metadata_models_convert_to_wire_compatible_grpc():
    meta = oip.ModelMetadata(
        name="m",
        versions=["1"],
        platform="espro",
        inputs=[oip.TensorMetadata(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[oip.TensorMetadata(name="probs", datatype="FP32", shape=[-1, 3])],
    )
    theirs = triton_pb.ModelMetadataResponse.FromString(meta.to_grpc().SerializeToString())
    assert list(theirs.inputs[0].shape) == [-1, 4]
    assert theirs.outputs[0].name == "probs"
    server = oip.ServerMetadata(name="espro", version="0.1.0", extensions=["binary_tensor_data"])
    wire = triton_pb.ServerMetadataResponse.FromString(server.to_grpc().SerializeToString())
    assert list(wire.extensions) == ["binary_tensor_data"]


def test_errors_carry_status_grpc_code_and_rest_body():
    error = ServiceError(400, "input 'x': no data")
    assert str(error) == "input 'x': no data"
    assert json.loads(error.rest_body()) == {"error": "input 'x': no data"}
    assert ServiceError(404, "").grpc_code is grpc.StatusCode.NOT_FOUND
    assert ServiceError(503, "").grpc_code is grpc.StatusCode.UNAVAILABLE
    assert ServiceError(500, "").grpc_code is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("binary", [True, False])
def test_response_parameters_reach_rest_and_grpc(binary):
    tensors = {"probabilities": np.zeros((2, 3), np.float32)}
    body, length = oip.encode_rest_response(
        "m", "1", None, tensors, binary, {"bundle_sha256": "ab"}
    )
    header = json.loads(body if length is None else body[:length])
    assert header["parameters"] == {"bundle_sha256": "ab"}
    response = oip.encode_grpc_response("m", "1", None, tensors, {"bundle_sha256": "ab"})
    assert response.parameters["bundle_sha256"].string_param == "ab"
