"""The Ray Serve application: the deployment that answers every door, and its builder.

``build_app`` is the application builder that ``espro serve`` and Serve config files
(``import_path: serving.app:build_app``) deploy; its ``args`` are an
:class:`~serving.settings.AppConfig`.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from serving.settings import AppConfig, DeploymentOptions

from .server import ModelServer


def cluster_device(device: str) -> str:
    """``auto`` is ``cuda`` when the Ray cluster has a GPU, else ``cpu``."""
    if device != "auto":
        return device
    return "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else "cpu"


def application(config: AppConfig, options: DeploymentOptions | None = None) -> Application:
    """The application serving ``config``: one deployment holding every bundle, with a GPU
    per replica when the device is CUDA, and the batching and model list as live-retunable
    ``user_config``. ``options`` (default: :class:`~serving.settings.DeploymentOptions`'s
    defaults) are Serve's, which a Serve config's ``deployments`` entry replaces."""
    device = cluster_device(config.device)
    options = options or DeploymentOptions()
    return ModelServer.options(
        **options.serve_options(num_gpus=1 if device == "cuda" else 0),
        user_config=config.tuning().model_dump(),
    ).bind(config, device)


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """The Serve application builder: :func:`application` of ``args``, an
    :class:`~serving.settings.AppConfig`."""
    return application(AppConfig.model_validate(args))


__all__ = ["ModelServer", "application", "build_app", "cluster_device"]
