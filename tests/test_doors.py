"""What the deployment's doors share, without Ray: refusals, bounded bodies, headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from helpers import GrpcContext
from serving.doors import grpc_error, http_error, inference_header_length, read_body
from serving.errors import STATUS_TRAILER, ServiceError


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _read(parts: tuple[bytes, ...], length: str | None, limit: int) -> bytearray:
    return asyncio.run(read_body(_chunks(*parts), length, limit))


def test_a_body_within_the_limit_is_read_whole():
    assert _read((b"ab", b"cd"), "4", 4) == b"abcd"
    assert _read((), None, 4) == b""


def test_a_declared_length_past_the_limit_is_refused_before_any_chunk():
    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("read a chunk")
        yield b""

    with pytest.raises(ServiceError, match="the body has 5 bytes; the limit is 4") as info:
        asyncio.run(read_body(never(), "5", 4))
    assert info.value.status == 413


@pytest.mark.parametrize("length", [None, "2", "junk"])
def test_a_body_that_grows_past_the_limit_is_refused_whatever_its_header_says(length):
    with pytest.raises(ServiceError, match="exceeds the limit of 4 bytes") as info:
        _read((b"abc", b"de"), length, 4)
    assert info.value.status == 413


def test_the_binary_header_length_is_a_byte_count_or_a_400():
    assert inference_header_length({}) is None
    assert inference_header_length({"inference-header-content-length": "12"}) == 12
    for bad in ("-1", "1e3", "١٢", "x" * 500):
        with pytest.raises(ServiceError, match="must be a byte count") as info:
            inference_header_length({"inference-header-content-length": bad})
        assert info.value.status == 400 and len(str(info.value)) < 200


def test_refusals_answer_with_their_status_and_one_json_line():
    answer = http_error(ServiceError(401, "a Bearer token is required"))
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(answer.body) == {"error": "a Bearer token is required"}
    assert "WWW-Authenticate" not in http_error(ServiceError(404, "no model")).headers


def test_grpc_refusals_carry_their_code_and_http_status():
    context = GrpcContext()
    grpc_error(context, ServiceError(404, "no model 'x'"))
    assert context.code == grpc.StatusCode.NOT_FOUND and context.details == "no model 'x'"
    assert context.trailer == [(STATUS_TRAILER, "404")]
