"""The server's configuration, validated by pydantic before anything starts.

:class:`AppConfig` is what the Serve application takes (``args`` of a Serve config file, or
the flags of ``espro serve``); :class:`Tuning` is the part a running deployment retunes live
through Serve's ``user_config``; :class:`DeploymentOptions` are Serve's own options for the
deployment; :class:`LaunchConfig` is where ``espro serve`` listens.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.engine import parse_engine

MiB = 1 << 20


class _Config(BaseModel):
    # Attribute docstrings become field descriptions: `espro serve --help` prints them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Tuning(_Config):
    """What every replica reloads without a restart (Serve ``user_config``)."""

    bundles: list[str] = Field(min_length=1)
    """Bundle directories, as the replicas see them, or their URLs (``s3://``, ``gs://``,
    ``https://``, ``file://``), which each replica fetches into its cache (:mod:`serving.fetch`);
    a model's newest version is listed last."""
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """The most requests one engine run takes together."""
    batch_wait_timeout_s: float = Field(default=0.002, ge=0.0, le=10.0)
    """How long a request that finds the engine idle waits for company; requests that queue
    while the engine runs are batched without waiting (0: never wait)."""
    max_fresh_draws: int = Field(default=0, ge=0, le=1024)
    """Draws per simplex a request may ask for beyond those stored, sampled on the replica.
    Applies to models without BatchNorm (their draws carry no statistics)."""


class AppConfig(Tuning):
    """The Serve application: its models, device, engine, batching and limits.

    Serve's own options for the deployment (replicas, CPUs, queue bounds) are not here: they
    are :class:`DeploymentOptions`, set by a Serve config's ``deployments`` entry."""

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """``cuda`` gives each replica one GPU; ``auto`` does so when the cluster has GPUs."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads per replica (default: the CPUs Ray reserved for it, at least 1)."""
    max_body_bytes: int = Field(default=64 * MiB, ge=1024)
    """The largest request body (HTTP) or message (gRPC); larger ones get 413."""
    allow_custom_architecture: bool = False
    """Build ``module:callable`` architectures named by a bundle (runs that module's code)."""
    auth_token_file: str | None = None
    """A file of bearer tokens (one per line) that every request but health checks must
    present; read by each replica at start and at every reconfiguration. None: no auth."""
    engine: str = "auto"
    """How replicas compute member outputs. ``auto`` times the exact engines on each bundle
    as it loads (one row each, then 2 s of calls at most, plus each one's preparation: an
    ONNX export takes seconds) and answers each range of batch sizes with the fastest,
    never slower than ``reference`` where measured; ``auto:bf16`` also times bf16 ones. Or
    one engine: ``reference`` (one forward per member), ``fused`` (every member at once),
    ``shortcut``, ``onnx``, with options such as ``fused:bf16,graphs`` (see
    :mod:`serving.engine`). Every fp32 engine answers the numbers of ``reference`` to 1e-5."""

    direct_grpc_port: int | None = Field(default=None, ge=1, le=65535)
    """A port where each replica also serves the OIP gRPC service itself, past Serve's proxy
    (:mod:`serving.app.direct`): more one-image requests per second on the same cores, but
    outside Serve's routing, queue bound and autoscaling. None: only Serve's doors."""
    direct_http_port: int | None = Field(default=None, ge=1, le=65535)
    """A port where each replica also serves the HTTP routes (native and OIP REST) itself,
    past Serve's proxy, with the same auth and answers, but outside Serve's routing, queue
    bound, ``request_timeout_s`` and autoscaling. None: only Serve's doors."""
    direct_host: str = "127.0.0.1"
    """The address the direct doors bind (``0.0.0.0`` or ``::`` for every interface)."""
    max_direct_rpcs: int = Field(default=256, ge=1)
    """Requests each of a replica's direct doors runs at once; past it they get
    ``RESOURCE_EXHAUSTED`` (gRPC) or 503 with ``Retry-After`` (HTTP)."""

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        parse_engine(value)
        return value

    def tuning(self) -> Tuning:
        """The live-retunable part, as the deployment's ``user_config``."""
        return Tuning.model_validate(self.model_dump(include=set(Tuning.model_fields)))


class DeploymentOptions(_Config):
    """Serve's options for the model deployment, under Serve's own names.

    ``espro serve`` takes them as flags and passes them to ``.options()``; a Serve config
    sets them in its ``deployments`` entry for ``espro`` (``ray_actor_options: {num_cpus:
    ...}``, ``backpressure_config: {retry_after_s: ...}``), which takes their place. The
    defaults here are the deployment's when neither sets them."""

    num_replicas: int = Field(default=1, ge=1)
    """Replicas of the model deployment."""
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs reserved per replica."""
    max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests a replica holds at once; at least ``max_batch_size``, or batches stay small.
    Past it Serve's router retries with backoff, which costs far more than a request queued
    in the replica (docs/performance.md)."""
    max_queued_requests: int = Field(default=256, ge=1)
    """Requests each proxy queues for the deployment; past it they get 503 with Retry-After."""
    retry_after_s: float = Field(default=1.0, ge=0.0)
    """The Retry-After a 503 carries."""

    def serve_options(self, *, num_gpus: int = 0) -> dict[str, Any]:
        """The keywords of ``Deployment.options`` these options are, with ``num_gpus`` GPUs
        per replica."""
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"retry_after_s": self.retry_after_s},
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": num_gpus},
        }


def check_batch_fits(tuning: Tuning, deployment: DeploymentOptions) -> None:
    """A ``ValueError`` where a replica could never fill a batch: Serve hands it at most
    ``max_ongoing_requests`` requests at once."""
    if deployment.max_ongoing_requests < tuning.max_batch_size:
        raise ValueError(
            f"max_ongoing_requests ({deployment.max_ongoing_requests}) must be at least "
            f"max_batch_size ({tuning.max_batch_size}): a replica never batches more "
            "requests than it holds"
        )


class LaunchConfig(_Config):
    """Where ``espro serve`` starts or joins Ray and where its doors listen."""

    address: str | None = None
    """A running Ray cluster to join (``auto`` or ``host:port``); default: start one here."""
    host: str = "127.0.0.1"
    """Where Serve's HTTP and gRPC doors listen, and, in a Ray started here, each replica's
    internal gRPC server (``0.0.0.0`` or ``::`` for every interface)."""
    http_port: int = Field(default=8000, ge=0, le=65535)
    """Serve's HTTP door: native JSON (``/v1``), OIP v2 REST (``/v2``) and the API docs."""
    grpc_port: int = Field(default=9000, ge=0, le=65535)
    """Serve's gRPC door (``inference.GRPCInferenceService``)."""
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    """Where a Ray started here exports Prometheus metrics (``/metrics``), on ``host``: Ray's
    exporter itself with a loopback host, else a relay of it in ``espro serve``."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a Ray started here (default: every core)."""
    num_gpus: int | None = Field(default=None, ge=0)
    """GPUs of a Ray started here (default: every visible GPU)."""
    request_timeout_s: float | None = Field(default=60.0, gt=0)
    """The doors answer 408 (gRPC ``DEADLINE_EXCEEDED``) to a request with no answer after this
    long, so none waits forever (``None``: no bound); clients may retry those. A client's
    header cannot lift it (:mod:`serving.proxy_headers`)."""

    @model_validator(mode="after")
    def _exposed_only_with_ray_auth(self) -> LaunchConfig:
        """Serve's gRPC door and each replica's internal gRPC server bind ``host``, and the
        internal one runs what it is sent; beyond loopback only Ray's token keeps strangers
        out, so a non-loopback host with ``RAY_AUTH_MODE=disabled`` is refused."""
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is beyond loopback while RAY_AUTH_MODE=disabled: anyone "
                "who reaches it could run code in the replicas; unset RAY_AUTH_MODE (espro "
                "then turns on Ray's token authentication) or listen on 127.0.0.1"
            )
        return self


class ServeSettings(NamedTuple):
    """What ``espro serve`` deploys, how Serve runs it, and where it listens."""

    app: AppConfig
    deployment: DeploymentOptions
    launch: LaunchConfig


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False
