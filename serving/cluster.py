"""Join a Ray cluster, or start a private one on loopback. Ray is imported only when called.

A Ray started here authenticates every internal call with a token of its own (Ray's token
mode), its workers bind Serve's wildcard gRPC servers to ``bind_host``
(:mod:`serving.bind_host`), and its HTTP proxy ignores the headers with which a client could
lift the request timeout (:mod:`serving.proxy_headers`). Ray runs code that its internal
ports send it, so none may answer strangers (docs/reliability.md).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from serving import proxy_headers
from serving.bind_host import BIND_HOST_ENV

LOCAL_RAY_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",  # never report usage to anyone
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": proxy_headers.CALLBACK,
}
"""Set for a Ray started here unless the environment says otherwise."""

AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
"""Where Ray reads its authentication settings; one set by the user is left as it is."""


def local_auth_environment() -> dict[str, str]:
    """A fresh random token, unless the environment already chooses a mode or a token.

    With a token and no mode, ``ray.init`` turns token authentication on for the cluster it
    starts (and refreshes the configuration it read at import, which setting the mode here
    would not). The token lives only in the environment of this process and of the Ray
    processes it starts, never in a file or a log."""
    if any(name in os.environ for name in AUTH_VARIABLES):
        return {}
    return {"RAY_AUTH_TOKEN": secrets.token_urlsafe(32)}


def connect(address: str | None = None, *, bind_host: str = "127.0.0.1", **local: Any) -> None:
    """Join the cluster at ``address`` (``auto`` or ``host:port``), or start a local Ray whose
    node address is 127.0.0.1, with ``local`` passed to ``ray.init``. A process that already
    belongs to a cluster (a test session, a notebook) stays in it.

    ``bind_host`` is where Serve's gRPC door and each replica's internal gRPC server listen
    in a Ray started here; a cluster joined keeps its own settings."""
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, log_to_driver=local.get("log_to_driver", True))
        return
    for key, value in (LOCAL_RAY_ENVIRONMENT | local_auth_environment()).items():
        os.environ.setdefault(key, value)
    os.environ[BIND_HOST_ENV] = bind_host  # read by every worker (serving.bind_host)
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _system_config={"preload_python_modules": ["serving.bind_host"]},
        **local,
    )
