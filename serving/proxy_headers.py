"""Strip the request headers with which a client could steer Serve's HTTP proxy.

Serve's proxy reads ``x-request-timeout-seconds`` to replace its ``request_timeout_s`` for
one request (0 or less removes the bound) and ``x-request-disconnect-disabled`` to keep
computing for a client that hung up. Both are for trusted callers in front of Serve; at
espro's door they would let any client hold a request open past the bound, so the proxy's
middleware removes them before the proxy reads them. A Ray started by espro loads it
through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (:mod:`serving.cluster`); a cluster
that espro joins sets that variable on its nodes (``k8s/base/rayservice.yaml``).

Only Starlette is imported: this module runs in Serve's proxy processes.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

STRIPPED_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
"""Header names (lower case, as ASGI gives them) that never reach Serve's proxy."""

CALLBACK = "serving.proxy_headers:middlewares"
"""The import path Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` takes."""


class StripProxyHeaders:
    """ASGI middleware: drops :data:`STRIPPED_HEADERS` from every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in STRIPPED_HEADERS]
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def middlewares() -> list[Middleware]:
    """The middlewares of Serve's HTTP proxy (its callback's contract)."""
    return [Middleware(StripProxyHeaders)]
