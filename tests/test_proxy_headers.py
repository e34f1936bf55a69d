"""The proxy middleware that keeps clients from steering Serve's timeout and disconnects."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.middleware import Middleware

from serving.proxy_headers import STRIPPED_HEADERS, StripProxyHeaders, middlewares


def passed_on(scope: dict[str, Any]) -> dict[str, Any]:
    """The scope the wrapped app receives."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    asyncio.run(StripProxyHeaders(app)(scope, None, None))
    return seen


@pytest.mark.parametrize("name", [b"x-request-timeout-seconds", b"X-Request-Disconnect-Disabled"])
@pytest.mark.parametrize("value", [b"0", b"-1", b"1e9", b"nan", b"?1"])
def test_steering_headers_never_reach_the_proxy(name, value):
    headers = [(b"authorization", b"Bearer t"), (name, value), (b"content-type", b"x")]
    scope = {"type": "http", "headers": headers}
    assert passed_on(scope)["headers"] == [(b"authorization", b"Bearer t"), (b"content-type", b"x")]
    assert scope["headers"] == headers  # the caller's scope is not changed


def test_other_scopes_pass_untouched():
    scope = {"type": "lifespan"}
    assert passed_on(scope) == scope


def test_the_callback_returns_starlette_middlewares():
    (middleware,) = middlewares()
    assert isinstance(middleware, Middleware) and middleware.cls is StripProxyHeaders
    assert all(name == name.lower() for name in STRIPPED_HEADERS)
