"""Join a Ray cluster, or start a private one on loopback. Ray is imported only when called."""

from __future__ import annotations

import os
from typing import Any

LOCAL_RAY_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",  # never report usage to anyone
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",  # a private, single-user cluster (see docs/serving.md)
}
"""Set for a Ray started here unless the environment says otherwise."""


def connect(address: str | None = None, **local: Any) -> None:
    """Join the cluster at ``address`` (``auto`` or ``host:port``), or start a local Ray whose
    node address is 127.0.0.1, with ``local`` passed to ``ray.init``. A process that already
    belongs to a cluster (a test session, a notebook) stays in it."""
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, log_to_driver=local.get("log_to_driver", True))
        return
    for key, value in LOCAL_RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **local)
