"""The Ray Serve application: the deployment that answers every door, and its builder.

``build_app`` is the application builder that ``espro serve`` and Serve config files
(``import_path: serving.app:build_app``) deploy; its ``args`` are an
:class:`~serving.settings.AppConfig`.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from serving.settings import AppConfig

from .server import ModelServer


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when the Ray cluster has a GPU, else ``cpu``."""
    if device != "auto":
        return device
    return "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else "cpu"


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """The application for ``args``: one deployment holding every bundle, with GPU replicas
    when the device is CUDA, Serve's bounded queue (503 with Retry-After past it), and the
    batching and model list as live-retunable ``user_config``."""
    config = AppConfig.model_validate(args)
    device = resolve_device(config.device)
    return ModelServer.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config={"retry_after_s": config.retry_after_s},
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": 1 if device == "cuda" else 0},
        user_config=config.tuning().model_dump(),
    ).bind(
        device=device,
        allow_custom_architecture=config.allow_custom_architecture,
        max_body_bytes=config.max_body_bytes,
        auth_token_file=config.auth_token_file,
        engine=config.engine,
        torch_threads=config.torch_threads or max(1, int(config.num_cpus)),
        direct_grpc_host=config.direct_grpc_host,
        direct_grpc_port=config.direct_grpc_port,
        max_direct_rpcs=config.max_ongoing_requests,
    )


__all__ = ["ModelServer", "build_app", "resolve_device"]
