"""Start (or join) Ray, start Serve's HTTP and gRPC doors, and deploy the application.

Importing this module imports neither torch nor the application (:mod:`serving.app`):
:func:`start` loads them, and verifies the bundles, in a thread while Ray starts, since each
takes seconds.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from ray import serve

from serving.bundle import load_bundle, read_manifest
from serving.cluster import connect
from serving.errors import DeployError
from serving.fetch import is_url, resolve_bundle
from serving.metrics_relay import MetricsRelay
from serving.settings import AppConfig, DeploymentOptions, LaunchConfig, ServeSettings, is_loopback

APP_NAME = "espro"
GRPC_SERVICER = "serving.proto.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
"""What Serve's gRPC proxy registers (``grpc_options.grpc_servicer_functions``)."""

_relay: MetricsRelay | None = None
"""The metrics relay of a Ray started here with a ``--host`` beyond loopback."""


def check_bundles(config: AppConfig) -> AppConfig:
    """Verify every bundle here before deploying, and make their paths absolute, so that a
    wrong path, a corrupt bundle or one its architecture does not fit is a clear error now
    rather than a failing replica later. A URL is fetched into this machine's cache to be
    verified and stays a URL: each replica fetches it where it runs."""
    from serving.predictor import check_architecture  # torch: not before Ray starts

    bundles = [b if is_url(b) else str(Path(b).resolve()) for b in config.bundles]
    for location in bundles:
        check_architecture(
            load_bundle(resolve_bundle(location)),
            allow_custom_architecture=config.allow_custom_architecture,
        )
    return config.model_copy(update={"bundles": bundles})


def _load(config: AppConfig) -> AppConfig:
    """Import the application (torch, FastAPI, the gRPC stubs) and verify every bundle."""
    import serving.app  # noqa: F401  (imported here for its cost, used by _run)

    return check_bundles(config)


def start(
    app: AppConfig,
    launch: LaunchConfig,
    deployment: DeploymentOptions | None = None,
    stop_requested: threading.Event | None = None,
) -> None:
    """Verify the bundles, start or join Ray, start Serve's doors, and deploy ``app`` with
    Serve's ``deployment`` options; returns once it is ready.

    Every local bundle's manifest is read before Ray starts, so a wrong path fails at once;
    the application is imported, bundle URLs fetched and the weights verified while Ray and
    Serve start. A bundle that fails that check is a :class:`~serving.errors.BundleError` once
    they are up.

    ``stop_requested``, if given, is set by SIGINT and SIGTERM once Ray is up, replacing the
    handlers ``ray.init`` installs, which end the process at once: ``espro serve`` aborted
    (exit -6) when stopped while its application was being deployed. A signal while Ray
    itself starts (a few seconds) still ends it at once.

    Replicas that fail to start are a :class:`~serving.errors.DeployError` naming what they
    raised. Whatever stops the start, Serve and a Ray started here are shut down first."""
    for location in app.bundles:
        if not is_url(location):
            read_manifest(location)
    # The proxy refuses larger gRPC messages with RESOURCE_EXHAUSTED before they reach us.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(app.max_body_bytes))
    ray_started_here = launch.address is None and not ray.is_initialized()
    relayed = ray_started_here and not is_loopback(launch.host)
    # Serve's serialisation setup imports pydantic.v1 while the loader imports FastAPI, which
    # imports it too; two threads importing that package at once failed with KeyError.
    import pydantic.v1.fields  # noqa: F401

    with ThreadPoolExecutor(1, thread_name_prefix="espro-load") as loader:
        loading = loader.submit(_load, app)
        connect(
            launch.address,
            bind_host=launch.host,
            num_cpus=launch.num_cpus,
            num_gpus=launch.num_gpus,
            # Relayed: the exporter takes a free loopback port and the relay --metrics-port.
            _metrics_export_port=0 if relayed else launch.metrics_port,
            log_to_driver=False,
        )
        if stop_requested is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop_requested.set())
        try:
            if relayed:
                _start_relay(launch.host, launch.metrics_port)
            serve.start(  # while the thread may still load (joining a running Ray: a second)
                http_options={
                    "host": launch.host,
                    "port": launch.http_port,
                    "request_timeout_s": launch.request_timeout_s,
                },
                grpc_options={
                    "port": launch.grpc_port,
                    "grpc_servicer_functions": [GRPC_SERVICER],
                    "request_timeout_s": launch.request_timeout_s,
                },
            )
            app = loading.result()
            _run(app, deployment)
        except BaseException:
            if ray_started_here:  # nothing of a failed start stays behind
                _stop_relay()
                serve.shutdown()
                ray.shutdown()
            raise


def _start_relay(host: str, port: int) -> None:
    """Relay the exporter of the local node, on loopback, to ``host:port``
    (:mod:`serving.metrics_relay`)."""
    global _relay
    node_id = ray.get_runtime_context().get_node_id()
    (node,) = [node for node in ray.nodes() if node["NodeID"] == node_id]
    try:
        _relay = MetricsRelay(host, port, int(node["MetricsExportPort"]))
    except OSError as err:
        raise DeployError(f"the metrics relay cannot listen on {host}:{port}: {err}") from None


def _stop_relay() -> None:
    global _relay
    if _relay is not None:
        _relay.close()
        _relay = None


def deploy(app: AppConfig, deployment: DeploymentOptions | None = None) -> None:
    """Update the running application to ``app`` with Serve's ``deployment`` options. Its
    bundles are verified here first, so a missing or corrupt one is refused while the running
    version keeps serving; then Serve starts replicas with the new config and drains and
    stops the old ones (docs/serving.md).
    Replicas that fail to start are a :class:`~serving.errors.DeployError`."""
    _run(check_bundles(app), deployment)


def _run(app: AppConfig, deployment: DeploymentOptions | None) -> None:
    from serving.app import application

    try:
        serve.run(application(app, deployment), name=APP_NAME, route_prefix="/")
    except RuntimeError as err:  # Serve's own message names no cause
        raise DeployError(_replica_errors() or str(err)) from None


def _replica_errors() -> str:
    """The exception each failed deployment's replicas raised: the last line of the
    traceback Serve keeps in the deployment's status message."""
    application = serve.status().applications.get(APP_NAME)
    deployments = application.deployments.values() if application else []
    lines = [d.message.strip().splitlines()[-1] for d in deployments if d.message.strip()]
    return "; ".join(lines)


def stop() -> None:
    """Drain requests in flight, remove the application and leave Ray.

    Deleting the application first lets its replicas finish their requests while the proxies
    still carry the answers back; shutting Serve down at once would drop them.
    """
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    _stop_relay()


def serve_until_stopped(settings: ServeSettings) -> None:
    """``espro serve``: deploy, print where the doors are, and drain on SIGINT or SIGTERM."""
    app, deployment, launch = settings
    stopped = threading.Event()
    start(app, launch, deployment, stopped)
    host = launch.host
    print(f"espro is serving {len(app.bundles)} bundle(s):")
    print(f"  HTTP     http://{host}:{launch.http_port}  (native /v1, OIP /v2, docs /docs)")
    print(f"  gRPC     {host}:{launch.grpc_port}  (inference.GRPCInferenceService)")
    if app.direct_http_port is not None:
        direct = f"http://{app.direct_host}:{app.direct_http_port}"
        print(f"  HTTP     {direct}  (the same, from each replica past Serve's proxy)")
    if app.direct_grpc_port is not None:
        direct = f"{app.direct_host}:{app.direct_grpc_port}"
        print(f"  gRPC     {direct}  (the same, from each replica past Serve's proxy)")
    if launch.address is None:
        metrics_host = "127.0.0.1" if is_loopback(host) else host
        print(f"  metrics  http://{metrics_host}:{launch.metrics_port}/metrics")
    print("Ctrl-C stops it.", flush=True)
    stopped.wait()
    print("draining and stopping...", flush=True)
    stop()
