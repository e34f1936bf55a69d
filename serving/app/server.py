"""The Ray Serve deployment: one ingress that owns the models, batches, and answers all doors.

HTTP (native JSON and OIP v2 REST) arrives through FastAPI routes; OIP v2 gRPC arrives through
Serve's gRPC proxy as calls of the methods named after the RPCs. Where configured, the replica's
own direct doors (:mod:`serving.app.direct`) take HTTP into the same routes and gRPC into the
same methods, past Serve's proxies.
Every door decodes its request into a :class:`~serving.service.Job` on the event loop and
submits it to the :class:`~serving.service.InferenceService`, which batches it with the jobs
of other requests; this module adds auth, metrics and the replica's lifecycle.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serving import __version__
from serving.auth import BearerTokens
from serving.doors import (
    http_error,
    inference_header_length,
    read_body,
)
from serving.errors import ServiceError
from serving.grpc_methods import OipGrpcMethods
from serving.oip import INTERNAL_ERROR, InferenceRequest, InferenceResponse
from serving.quoting import quote
from serving.service import (
    InferenceService,
    ModelRepository,
    model_list,
    model_metadata,
)
from serving.settings import AppConfig, Tuning
from serving.wire import PredictRequest, PredictResponse

from .direct import (
    DIRECT_SCOPE,
    RPCS,
    DirectHttpDoor,
    Routes,
    start_direct_door,
    start_direct_http_door,
)
from .metrics import ServerMetrics
from .openapi import json_answer, json_body

logger = logging.getLogger("ray.serve")
DRAIN_S = 10.0
"""How long a stopping replica's direct doors let the requests in flight finish."""
PREDICT = "/v1/models/{name}/predict"
INFER = "/v2/models/{name}/infer"
INFER_VERSION = "/v2/models/{name}/versions/{version}/infer"
"""The routes that run the models, which the direct HTTP door answers past FastAPI's router."""

api = FastAPI(
    title="espro",
    version=__version__,
    description=(
        "Calibrated predictions with uncertainty from ESPRO ensembles: a native JSON door "
        "(`/v1`) and the Open Inference Protocol v2 (`/v2`, JSON and binary tensors)."
    ),
)


class _ToServeLog(logging.Handler):
    """Hands espro's own records (``serving.*``: bundle fetches, engine choices) to Serve's
    logger, whose handlers write the replica's log; Serve sets up no other logger."""

    def emit(self, record: logging.LogRecord) -> None:
        logger.handle(record)


def _log_to_serve() -> None:
    espro = logging.getLogger("serving")
    espro.setLevel(logging.INFO)
    espro.propagate = False
    if not any(isinstance(h, _ToServeLog) for h in espro.handlers):
        espro.addHandler(_ToServeLog())


def _reserved_cpus() -> int:
    """The whole CPUs Ray reserved for this replica, at least 1."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


@serve.deployment(name="espro")
@serve.ingress(api)
class ModelServer(OipGrpcMethods):
    """Serves every bundle of its ``user_config`` (see :class:`~serving.settings.Tuning`).

    Serve pickles this class when it is decorated, so every module-level name it uses must be
    defined above it.
    """

    def __init__(self, config: AppConfig, device: str) -> None:
        """``config`` as validated where the app was built; ``device`` resolved there."""
        torch.set_num_threads(config.torch_threads or _reserved_cpus())
        _log_to_serve()
        self.config, self.device = config, device
        self._direct_grpc: grpc.aio.Server | None = None
        self._direct_http: DirectHttpDoor | None = None
        self.tokens = self._read_tokens()
        self.metrics = ServerMetrics()
        self.service = InferenceService(ModelRepository(), __version__, self.metrics)
        self._model_info: asyncio.Task[None] | None = None
        self._refused = 0  # bundles of the configuration that did not load

    # -- configuration -------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the listed bundles, then swap them in at once; requests in flight finish on
        the predictors they started with.

        A bundle that fails to load (corrupt, missing, unbuildable) is refused and logged, and
        the replica serves the others, so a bad new version deployed by any path (``serve
        deploy`` included) leaves the older versions serving; ``ray_espro_bundles_refused``
        counts them. If none loads, the update fails."""
        tuning = Tuning.model_validate(user_config)
        self.tokens = self._read_tokens()  # again, so that rotated tokens take effect
        repository, refused = await asyncio.to_thread(
            ModelRepository.load,
            tuning.bundles,
            device=self.device,
            allow_custom_architecture=self.config.allow_custom_architecture,
            engine=self.config.engine,
            max_fresh_draws=tuning.max_fresh_draws,
            reuse=self.service.repository.predictors(),
        )
        for reason in refused:
            logger.error("refusing bundle %s", reason)  # a BundleError names its bundle
        self.service.repository, self._refused = repository, len(refused)
        self.service.configure_batching(
            max_batch_size=tuning.max_batch_size,
            batch_wait_timeout_s=tuning.batch_wait_timeout_s,
        )
        if self._model_info is None:
            self._model_info = asyncio.create_task(self._refresh_model_info())
        await self._open_direct_doors()
        served = (f"{p.manifest.name}:{p.manifest.version}" for p in repository.predictors())
        logger.info("serving %s on %s", ", ".join(served), self.device)

    async def _open_direct_doors(self) -> None:
        """Start the direct doors the config names, once per replica."""
        config = self.config
        if config.direct_grpc_port is not None and self._direct_grpc is None:
            methods = {name: getattr(self, name) for name in RPCS}
            methods["ModelInfer"] = functools.partial(self.grpc_infer, door="grpc-direct")
            self._direct_grpc = await start_direct_door(
                methods,
                host=config.direct_host,
                port=config.direct_grpc_port,
                max_message_bytes=config.max_body_bytes,
                max_in_flight=config.max_direct_rpcs,
            )
        if config.direct_http_port is not None and self._direct_http is None:
            endpoints = {PREDICT: self.predict, INFER: self.infer, INFER_VERSION: self.infer}
            self._direct_http = await start_direct_http_door(
                Routes(self.app, endpoints),  # self.app: the FastAPI app Serve's ingress bound
                host=config.direct_host,
                port=config.direct_http_port,
                max_in_flight=config.max_direct_rpcs,
                drain_s=DRAIN_S,
            )

    async def __del__(self) -> None:
        """Serve calls this as the replica stops: the direct doors take no new requests and
        finish those in flight, both at once."""
        stops = []
        if self._direct_grpc is not None:
            stops.append(self._direct_grpc.stop(DRAIN_S))
        if self._direct_http is not None:
            stops.append(self._direct_http.stop())
        self._direct_grpc = self._direct_http = None
        await asyncio.gather(*stops)

    async def _refresh_model_info(self) -> None:
        while True:
            served = self.service.repository.predictors()
            self.metrics.models(served, self._refused)
            await asyncio.sleep(1.0)

    async def _handle(
        self, door: str, model: str, request: Request, work: Callable[[], Awaitable[Response]]
    ) -> Response:
        """Answer an HTTP request, turning refusals into their status and counting it."""
        start = time.perf_counter()
        if request.scope.get(DIRECT_SCOPE):
            door = f"{door}-direct"
        try:
            self.tokens.check(request.headers.get("authorization"))
            response = await work()
        except ServiceError as err:
            response = http_error(err)
        except Exception:
            logger.exception("%s request for model %s failed", door, quote(model))
            response = http_error(ServiceError(500, INTERNAL_ERROR))
        self.metrics.request(
            door, self.model_tag(model), response.status_code, time.perf_counter() - start
        )
        return response

    def _read_tokens(self) -> BearerTokens:
        if self.config.auth_token_file is None:
            return BearerTokens()
        return BearerTokens.from_file(self.config.auth_token_file)

    def _json(self, request: Request, answer: Callable[[], Any]) -> Response:
        """A metadata route's JSON answer, once the request's token is accepted; a refusal
        (401, 404) as its status and message."""
        try:
            self.tokens.check(request.headers.get("authorization"))
            return JSONResponse(answer())
        except ServiceError as err:
            return http_error(err)

    async def _body(self, request: Request) -> bytearray:
        limit = self.config.max_body_bytes
        return await read_body(request.stream(), request.headers.get("content-length"), limit)

    # -- native JSON ---------------------------------------------------------------------

    @api.get("/v1/models", summary="The models served, with their versions and bundle hashes")
    def list_models(self, request: Request) -> Response:
        return self._json(request, lambda: model_list(self.service.repository))

    @api.post(
        PREDICT,
        summary="Calibrated prediction with uncertainty, one record per instance",
        openapi_extra=json_body(PredictRequest),
        responses=json_answer(PredictResponse),
    )
    async def predict(self, name: str, request: Request) -> Response:
        async def work() -> Response:
            job = self.service.native_job(name, await self._body(request))
            return Response(await self.service.submit(job), media_type="application/json")

        return await self._handle("native", name, request, work)

    # -- Open Inference Protocol v2, REST --------------------------------------------------

    @api.get("/v2", summary="Server metadata")
    def server_metadata(self, request: Request) -> Response:
        return self._json(request, lambda: self.service.server_metadata().model_dump())

    @api.get("/v2/health/live", summary="Liveness")
    def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", summary="Readiness: 200 once a model is loaded")
    def ready(self) -> Response:
        ready = bool(self.service.repository.names())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @api.get("/v2/models/{name}", summary="Model metadata (the newest version)")
    @api.get("/v2/models/{name}/versions/{version}", summary="Model metadata")
    def model_metadata(self, name: str, request: Request, version: str | None = None) -> Response:
        repository = self.service.repository
        return self._json(request, lambda: model_metadata(repository, name, version).model_dump())

    @api.get("/v2/models/{name}/ready", summary="Model readiness")
    @api.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
    def model_ready(self, name: str, request: Request, version: str | None = None) -> Response:
        def answer() -> dict[str, Any]:
            self.service.repository.get(name, version)  # 404 for an unknown model or version
            return {"name": name, "ready": True}

        return self._json(request, answer)

    @api.post(
        INFER,
        summary="Inference (the newest version)",
        openapi_extra=json_body(InferenceRequest, binary=True),
        responses=json_answer(InferenceResponse),
    )
    @api.post(
        INFER_VERSION,
        summary="Inference",
        openapi_extra=json_body(InferenceRequest, binary=True),
        responses=json_answer(InferenceResponse),
    )
    async def infer(self, name: str, request: Request, version: str | None = None) -> Response:
        async def work() -> Response:
            length = inference_header_length(request.headers)
            job = self.service.rest_job(name, version, await self._body(request), length)
            body, json_length = await self.service.submit(job)
            if json_length is None:
                return Response(body, media_type="application/json")
            return Response(
                body,
                media_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(json_length)},
            )

        return await self._handle("rest", name, request, work)
