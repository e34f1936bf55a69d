"""Request bodies cost memory in proportion to their size, whatever they hold, and the native
door is as strict about JSON types as the OIP doors.

Parsers that build a Python object per array element (``json``, pydantic) took 1.5 to 4 s and
20 to 43 times the body's size to refuse 16 MiB of nested empty lists, in-process. Peak memory
is measured here with ``tracemalloc`` around the decode (``InferenceService.native_job`` and
``rest_job``): it traces Python's allocations and numpy's. The service runs in-process on the
``tiny`` bundle (inputs of shape ``[batch, 4]``), no Ray needed.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_bundle
from serving.bundle import load_bundle
from serving.errors import JSONError, ServiceError
from serving.jsonarray import OTHER_LIMIT, JSONArray, read_json
from serving.oip import RequestOptions
from serving.predictor import Predictor
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.quoting import QUOTE_LIMIT
from serving.service import INPUT, InferenceService, ModelRepository, native_inputs

HOSTILE_SIZE = 16 << 20
MAX_PEAK = 4.0
"""The most memory a decode may hold at once, as a multiple of the body's size."""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> InferenceService:
    root = tmp_path_factory.mktemp("memory")
    return InferenceService(
        ModelRepository([Predictor(load_bundle(tiny_bundle().write(root / "tiny")))])
    )


def peak_ratio(call: Callable[[], Any], body: bytes) -> tuple[Any, float]:
    """``call()``'s result (or the ServiceError it raised) and its peak memory over
    ``len(body)``."""
    tracemalloc.start()
    try:
        result: Any = call()
    except ServiceError as err:
        result = err
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak / len(body)


def repeated(head: bytes, item: bytes, tail: bytes) -> bytes:
    """``head`` + ``item,item,…,item`` + ``tail``, :data:`HOSTILE_SIZE` bytes or about."""
    count = (HOSTILE_SIZE - len(head) - len(tail)) // (len(item) + 1)
    return head + (item + b",") * (count - 1) + item + tail


NATIVE_HOSTILE = {
    "empty-rows": lambda: repeated(b'{"inputs": [', b"[]", b"]}"),
    "nested-2": lambda: repeated(b'{"inputs": [', b"[[]]", b"]}"),
    "nested-4": lambda: repeated(b'{"inputs": [', b"[[[[]]]]", b"]}"),
    "deep": lambda: b'{"inputs": ' + b"[" * (HOSTILE_SIZE // 2) + b"]" * (HOSTILE_SIZE // 2) + b"}",
}
REST_HEAD = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ['


def refusal(call: Callable[[], Any], body: bytes) -> float:
    """Check that ``call`` refuses ``body`` with a 400 in bounded memory; return the peak
    memory as a multiple of the body's size. (Its time is a benchmark's:
    benchmarks/request_decode.py.)"""
    with pytest.raises(ServiceError) as err:
        call()
    assert err.value.status == 400, err.value.message
    error, ratio = peak_ratio(call, body)
    assert isinstance(error, ServiceError) and error.status == 400
    return ratio


@pytest.mark.parametrize("kind", NATIVE_HOSTILE)
def test_16_mib_of_nested_empty_lists_is_refused_in_bounded_memory(service, kind):
    body = NATIVE_HOSTILE[kind]()
    assert refusal(lambda: service.native_job("tiny", body), body) < MAX_PEAK


@pytest.mark.parametrize("item", [b"[]", b"[[]]", b"[1, 2]"], ids=["empty", "nested", "rows"])
def test_16_mib_of_nested_lists_in_oip_rest_data_is_refused_in_bounded_memory(service, item):
    body = repeated(REST_HEAD, item, b"]}]}")
    assert refusal(lambda: service.rest_job("tiny", None, body, None), body) < MAX_PEAK


def random_rows(rows: int) -> list[list[Any]]:
    """Numbers as clients write them: float32 values, ints, exponents, negative zero."""
    rng = np.random.default_rng(0)
    values: list[Any] = (rng.standard_normal(rows * 4).astype(np.float32) * 100).tolist()
    values[::7] = rng.integers(-(2**40), 2**40, len(values[::7])).tolist()
    values[::11] = (rng.standard_normal(len(values[::11])) * 1e30).tolist()
    values[5] = -0.0
    return [values[i : i + 4] for i in range(0, len(values), 4)]


def test_a_large_native_body_decodes_exactly_in_bounded_memory(service):
    body = json.dumps({"inputs": random_rows(100_000), "draws": 1}).encode()
    assert len(body) > 4 << 20
    job, ratio = peak_ratio(lambda: service.native_job("tiny", body), body)
    assert ratio < MAX_PEAK
    want = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
    np.testing.assert_array_equal(job.inputs.numpy(), want)


def test_a_large_oip_rest_body_decodes_exactly_in_bounded_memory(service):
    rows = random_rows(100_000)
    tensor = {"name": INPUT, "shape": [len(rows), 4], "datatype": "FP32", "data": rows}
    body = json.dumps({"inputs": [tensor]}).encode()
    job, ratio = peak_ratio(lambda: service.rest_job("tiny", None, body, None), body)
    assert ratio < MAX_PEAK
    np.testing.assert_array_equal(job.inputs.numpy(), np.asarray(rows, dtype=np.float32))


# --------------------------------------------------------------------------- exact numbers

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(-1e4, 1e4, width=32),
    st.sampled_from([0.0, -0.0, 5e-324, 1.7976931348623157e308, 3.4028235e38, 2**24 + 1]),
)
SEPARATORS = st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")])


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    data=st.data(),
    separators=SEPARATORS,
)
def test_arrays_read_to_the_numbers_json_loads_gives(shape, data, separators):
    """Any rectangular array of JSON numbers, however spaced, reads to the float32 values of
    ``np.asarray(json.loads(...), np.float32)``, or is refused where that overflows."""
    values = data.draw(st.lists(NUMBERS, min_size=math.prod(shape), max_size=math.prod(shape)))
    nested = np.array(values, dtype=object).reshape(shape).tolist()
    body = json.dumps({"inputs": nested}, separators=separators).encode()
    document = read_json(body, lambda path: len(shape) if path == ("inputs",) else None)
    try:
        with np.errstate(over="raise"):
            want = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
    except (FloatingPointError, OverflowError):
        with pytest.raises(ServiceError, match="float32's range"):
            native_inputs(document["inputs"])
        return
    got = native_inputs(document["inputs"])
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_nan_and_infinity_read_as_json_loads_reads_them():
    body = b'{"inputs": [NaN, Infinity, -Infinity, 1e400]}'
    array = read_json(body, lambda path: 1)["inputs"]
    assert not array.plain
    assert str(native_inputs(array).tolist()) == "[nan, inf, -inf, inf]"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[[1, 2], [3]]", "inputs must be a rectangular array"),
        (b"[[1], []]", "inputs must be a rectangular array"),
        (b"[[1, 2], 3]", "inputs must be a rectangular array"),
        (b"[[[1]]]", "inputs is nested deeper than 2 levels"),
    ],
)
def test_ragged_or_deep_arrays_are_refused(text, message):
    body = b'{"inputs": ' + text + b"}"
    with pytest.raises(JSONError, match=message) as err:
        read_json(body, lambda path: 2)["inputs"].to_numpy(np.float64, lambda values: values)
    assert err.value.status == 400


@pytest.mark.parametrize(
    "text", [b"[1, 2", b"[01]", b"[1.]", b"[.5]", b"[+1]", b"[1,,2]", b"[1 2]", b"[-NaN]", b"[nan]"]
)
def test_arrays_json_refuses_are_refused(text):
    body = b'{"inputs": ' + text + b"}"
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(JSONError, match=r"not closed|rectangular array of numbers: ") as err:
        read_json(body, lambda path: 2)["inputs"].to_numpy(np.float64, lambda values: values)
    assert err.value.status == 400


def test_text_outside_arrays_of_numbers_is_limited():
    pad = " " * OTHER_LIMIT
    with pytest.raises(JSONError, match="over 65536 bytes") as err:
        read_json(f'{{"inputs": [1], "x": "{pad}"}}'.encode(), lambda path: 1)
    assert err.value.status == 413
    big_array = b'{"inputs": [' + b"1, " * OTHER_LIMIT + b'1], "x": 1}'
    assert isinstance(read_json(big_array, lambda path: 1)["inputs"], JSONArray)


# --------------------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": [["1.5", 2, 3, 4]]}, 400, "array of numbers, got a string"),
        ({"inputs": [[True, 2, 3, 4]]}, 400, "array of numbers, got true/false"),
        ({"inputs": [[None, 2, 3, 4]]}, 400, "array of numbers, got null"),
        ({"inputs": [["1+2j", 2, 3, 4]]}, 400, "got a string"),
        ({"inputs": [[{"re": 1, "im": 2}, 2, 3, 4]]}, 400, "got an object"),
        ({"inputs": [[1, 2, 3, 4]], "return_members": "yes"}, 422, "return_members: Input should"),
        ({"inputs": [[1, 2, 3, 4]], "return_members": 1}, 422, "return_members"),
        ({"inputs": [[1, 2, 3, 4]], "draws": "2"}, 422, "draws: Input should be a valid integer"),
        ({"inputs": [[1, 2, 3, 4]], "draws": 2.0}, 422, "draws: Input should be a valid integer"),
        ({"inputs": [[1, 2, 3, 4]], "draws": True}, 422, "draws: Input should be a valid integer"),
        ({"inputs": "[[1, 2, 3, 4]]"}, 422, "inputs: Input should be a valid list"),
        ({"inputs": []}, 422, "inputs: List should have at least 1 item"),
        ({"draws": 1}, 422, "inputs: Field required"),
        ([[1, 2, 3, 4]], 422, "Input should be a valid dictionary"),
        ({"inputs": [[1, 2, 3, 10**400]]}, 400, "float32's range"),
    ],
)
def test_the_native_door_takes_json_types_strictly(service, body, status, message):
    with pytest.raises(ServiceError) as err:
        service.native("tiny", json.dumps(body).encode())
    assert err.value.status == status, err.value.message
    assert message in err.value.message


def test_complex_inputs_are_refused_not_cut_to_their_real_part(service):
    """Every door's arrays go through ``InferenceService.job``."""
    predictor = service.repository.get("tiny")
    x = np.ones((1, 4), dtype=np.complex64)
    with pytest.raises(ServiceError, match="inputs must be real numbers, got complex64"):
        service.job(predictor, x, RequestOptions(), lambda prediction: prediction)


@pytest.mark.parametrize(
    ("door", "body"),
    [
        ("native", b'{"inputs": [[1, 2, 3, 4]], "draws": 2, "draws": 1}'),
        ("native", b'{"inputs": [[1, 2, 3, 4]], "inputs": [[5, 6, 7, 8]]}'),
        (
            "rest",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", '
            b'"datatype": "FP64", "data": [1, 2, 3, 4]}]}',
        ),
        ("rest", b'{"inputs": [], "parameters": {"draws": 1, "draws": 2}}'),
    ],
)
def test_a_key_repeated_in_one_object_is_refused(service, door, body):
    repeated = r"the body repeats the key '(draws|inputs|datatype)' in one object"
    with pytest.raises(ServiceError, match=repeated) as err:
        if door == "native":
            service.native("tiny", body)
        else:
            service.rest_infer("tiny", None, body, None)
    assert err.value.status == 400


# --------------------------------------------------------------------------- echoed text

LONG = "x" * 100_000
GOOD_INPUT = {"name": INPUT, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}


def grpc_request(**fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(**fields)
    tensor = request.inputs.add(name=fields.pop("input_name", INPUT), datatype="FP32")
    tensor.shape[:] = [1, 4]
    tensor.contents.fp32_contents[:] = [1, 2, 3, 4]
    return request


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.grpc_infer(grpc_request(model_name=LONG)),
        lambda s: s.grpc_infer(grpc_request(model_name="tiny", model_version=LONG)),
        lambda s: s.native(LONG, b'{"inputs": [[1, 2, 3, 4]]}'),
        lambda s: s.rest_infer("tiny", LONG, b'{"inputs": []}', None),
        lambda s: s.native(
            "tiny", b'{"inputs": [[1, 2, 3, 4]], "%s": 1, "%s": 2}' % (LONG.encode(), LONG.encode())
        ),
        lambda s: s.native("tiny", b'{"inputs": [[1, 2, 3, 4]], "' + LONG.encode() + b"}"),
        lambda s: s.rest_infer(
            "tiny",
            None,
            json.dumps(
                {"inputs": [{"name": LONG, "shape": [1], "datatype": "FP32", "data": [1]}]}
            ).encode(),
            None,
        ),
        lambda s: s.rest_infer(
            "tiny",
            None,
            json.dumps({"inputs": [GOOD_INPUT], "parameters": {"draws": LONG}}).encode(),
            None,
        ),
        lambda s: s.rest_infer(
            "tiny",
            None,
            json.dumps({"inputs": [GOOD_INPUT], "outputs": [{"name": LONG}]}).encode(),
            None,
        ),
    ],
    ids=[
        "grpc-model",
        "grpc-version",
        "native-model",
        "rest-version",
        "repeated-key",
        "unclosed-key",
        "input-name",
        "parameter-value",
        "output-name",
    ],
)
def test_client_text_is_quoted_cut_short_in_refusals(service, call):
    with pytest.raises(ServiceError) as err:
        call(service)
    message = err.value.message
    assert 400 <= err.value.status < 500
    assert "x" * (QUOTE_LIMIT + 1) not in message and len(message) < 4 * QUOTE_LIMIT, message
