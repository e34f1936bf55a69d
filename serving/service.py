"""Three front doors, one contract: the request handling behind the native JSON, OIP v2 REST
and OIP v2 gRPC doors, as a plain class with no server in it.

A Ray Serve application (or a test) moves bytes and messages to :class:`InferenceService` and
back; every door decodes into the same arrays, runs the same :class:`~serving.predictor.
Predictor`, and encodes the same numbers. Every refusal is a
:class:`~serving.errors.ServiceError` carrying the HTTP status (and through it the gRPC code)
and a message naming the problem.

The service also batches the jobs of concurrent requests (:meth:`InferenceService.submit`),
and :meth:`ModelRepository.load` holds the policy for loading bundles, so that the Ray Serve
application keeps only routes, auth, metrics and lifecycle, and all of this is tested without
Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from pydantic import ValidationError

from serving import __version__
from serving.batching import Batcher
from serving.bundle import load_bundle
from serving.errors import BundleError, InputError, ServiceError, describe_validation_error
from serving.fetch import resolve_bundle
from serving.images import decode_images, from_base64, sniff
from serving.jsonarray import NOT_AN_ARRAY, JSONArray, read_json
from serving.manifest import ImageSpec, Manifest, Task
from serving.oip import (
    ModelMetadata,
    RequestOptions,
    ServerMetadata,
    TensorMetadata,
    binary_outputs,
    decode_grpc_request,
    decode_rest_request,
    encode_grpc_response,
    encode_rest_response,
    request_options,
    select_outputs,
)
from serving.predictive import RegressionPrediction, finite_instances, split_batch
from serving.predictor import Prediction, Predictor, calibrated_prediction
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.quoting import quote
from serving.wire import PredictRequest, predict_response

R = TypeVar("R")
logger = logging.getLogger(__name__)

INPUT = "input"
"""The name of the one OIP input tensor: raw instances ``[batch, *input_shape]``."""

CLASSIFICATION_OUTPUTS = {
    "probabilities": ("FP32", 2),
    "label": ("INT64", 1),
    "class_name": ("BYTES", 1),
    "confidence": ("FP32", 1),
    "entropy": ("FP32", 1),
    "expected_entropy": ("FP32", 1),
    "mutual_information": ("FP32", 1),
    "disagreement": ("FP32", 1),
    "prediction_set": ("BOOL", 2),
    "abstain": ("BOOL", 1),
}
REGRESSION_OUTPUTS = {name: ("FP32", 1) for name in ("mean", "variance", "aleatoric", "epistemic")}
"""OIP output tensors by name: datatype and rank (the batch dimension included)."""


class ModelRepository:
    """Predictors by model name and version; the version added last answers by default."""

    def __init__(self, predictors: list[Predictor] | None = None) -> None:
        self._models: dict[str, dict[str, Predictor]] = {}
        for predictor in predictors or []:
            self.add(predictor)

    def add(self, predictor: Predictor) -> None:
        """Serve ``predictor`` under its bundle's name and version (replacing that version)."""
        manifest = predictor.manifest
        versions = self._models.setdefault(manifest.name, {})
        versions.pop(manifest.version, None)  # re-adding makes it the newest
        versions[manifest.version] = predictor

    @classmethod
    def load(
        cls,
        paths: Iterable[str],
        *,
        device: str = "cpu",
        allow_custom_architecture: bool = False,
        engine: str = "reference",
        max_fresh_draws: int = 0,
        reuse: Iterable[Predictor] = (),
    ) -> tuple[ModelRepository, list[str]]:
        """The bundles at ``paths`` (directories, or URLs fetched into this machine's cache,
        :mod:`serving.fetch`) that load, built and warmed up, and why each other one was
        refused, so that one bad bundle leaves the others serving. Each bundle built logs its
        engine in one INFO line (``auto``: the choice per range of batch sizes, with times).

        A bundle whose digest matches a predictor of ``reuse`` keeps that predictor: reloading
        an unchanged bundle costs neither a build nor a warm-up. Models with BatchNorm get no
        fresh draws (a draw needs its own statistics). Raises :class:`BundleError` if none
        loads."""
        reused = {predictor.bundle.digest: predictor for predictor in reuse}
        repository, refused = cls(), []
        for path in paths:
            try:
                bundle = load_bundle(resolve_bundle(path))
                predictor = reused.get(bundle.digest)
                if predictor is None:
                    predictor = Predictor(
                        bundle,
                        device=device,
                        allow_custom_architecture=allow_custom_architecture,
                        engine=engine,
                    )
                    predictor.warm_up()  # an ONNX export takes seconds: not on a request
                    manifest, engine_line = bundle.manifest, predictor.describe_engine()
                    logger.info("%s:%s engine %s", manifest.name, manifest.version, engine_line)
            except (ValueError, OSError, RuntimeError) as err:  # BundleError is a ValueError
                refused.append(str(err) if isinstance(err, BundleError) else f"{path}: {err}")
                continue
            predictor.max_fresh_draws = 0 if bundle.manifest.buffer_names else max_fresh_draws
            repository.add(predictor)
        if not repository.names():
            raise BundleError(f"no bundle of the configuration loads: {'; '.join(refused)}")
        return repository, refused

    def predictors(self) -> list[Predictor]:
        """Every predictor served, of every model and version."""
        return [p for versions in self._models.values() for p in versions.values()]

    def names(self) -> list[str]:
        return list(self._models)

    def versions(self, name: str) -> list[str]:
        return list(self._get_versions(name))

    def _get_versions(self, name: str) -> dict[str, Predictor]:
        if name not in self._models:
            known = ", ".join(self._models) or "none"
            raise ServiceError(404, f"unknown model {quote(name)}; served models: {known}")
        return self._models[name]

    def get(self, name: str, version: str | None = None) -> Predictor:
        """The predictor of ``name`` at ``version`` (the newest when ``None`` or empty)."""
        versions = self._get_versions(name)
        if not version:
            return next(reversed(versions.values()))
        if version not in versions:
            raise ServiceError(
                404,
                f"model {quote(name)} has no version {quote(version)}; "
                f"versions: {', '.join(versions)}",
            )
        return versions[version]


def prediction_tensors(
    prediction: Prediction, class_names: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """The OIP output tensors of a prediction (member outputs when they were asked for);
    ``class_name`` holds each instance's label's name, from ``class_names``."""
    if isinstance(prediction, RegressionPrediction):
        tensors = {name: getattr(prediction, name) for name in REGRESSION_OUTPUTS}
        members = {
            "member_means": prediction.member_means,
            "member_variances": prediction.member_variances,
        }
    else:
        tensors = {
            "probabilities": prediction.probs,
            "label": prediction.labels,
            "class_name": np.array([class_names[i] for i in prediction.labels.tolist()], object)
            if class_names
            else None,
            "confidence": prediction.confidence,
            "entropy": prediction.entropy,
            "expected_entropy": prediction.expected_entropy,
            "mutual_information": prediction.mutual_information,
            "disagreement": prediction.disagreement,
            "prediction_set": prediction.prediction_sets,
            "abstain": prediction.abstain,
        }
        # Members on dim 1 so that the batch stays first, as for every other output.
        probs = prediction.member_probs
        members = {"member_probabilities": None if probs is None else probs.transpose(0, 1)}
    arrays = {k: v for k, v in (tensors | members).items() if v is not None}
    return {
        name: value
        if isinstance(value, np.ndarray)
        else (value.float() if value.is_floating_point() else value).numpy()
        for name, value in arrays.items()
    }


def model_list(repository: ModelRepository) -> dict[str, Any]:
    """``GET /v1/models``: every model's versions, each with its bundle's hash."""
    return {
        "models": [
            {
                "name": name,
                "versions": [
                    {"version": v, "bundle_sha256": repository.get(name, v).bundle.digest}
                    for v in repository.versions(name)
                ],
            }
            for name in repository.names()
        ]
    }


def model_metadata(repository: ModelRepository, name: str, version: str | None) -> ModelMetadata:
    """The OIP metadata of a model: its versions and its tensor signatures.

    A model trained on images lists its input twice, as numbers and as BYTES (one encoded
    image per element): a request sends it in either form."""
    manifest = repository.get(name, version).manifest
    outputs = CLASSIFICATION_OUTPUTS if manifest.task is Task.CLASSIFICATION else REGRESSION_OUTPUTS
    width = manifest.num_outputs
    inputs = [TensorMetadata(name=INPUT, datatype="FP32", shape=[-1, *manifest.input.shape])]
    if manifest.input.image is not None:
        inputs.append(TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1]))
    return ModelMetadata(
        name=name,
        versions=repository.versions(name),
        platform="espro",
        inputs=inputs,
        outputs=[
            TensorMetadata(name=out, datatype=dtype, shape=[-1, width][:rank])
            for out, (dtype, rank) in outputs.items()
        ],
    )


@dataclass(frozen=True)
class Job(Generic[R]):
    """A decoded, validated request: the members to run on which inputs, and how to answer.

    :meth:`run` answers it alone; a batcher may instead concatenate the inputs of jobs that
    share a predictor and members, run :meth:`member_outputs` once, pool them with
    :meth:`predictions`, and :attr:`encode` each job's prediction.
    """

    predictor: Predictor
    inputs: torch.Tensor
    """Float32 ``[B, *input_shape]``, already checked against the bundle's input spec."""
    members: tuple[int, ...]
    return_members: bool
    encode: Callable[[Prediction], R]

    @property
    def batch_key(self) -> tuple[int, tuple[int, ...]]:
        """Jobs with equal keys may share one engine run."""
        return id(self.predictor), self.members

    def member_outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The engine: member outputs ``[S, B, ·]`` on the CPU."""
        return self.predictor.member_outputs(inputs, self.members)

    @staticmethod
    def predictions(
        jobs: Sequence[Job[Any]], outputs: torch.Tensor
    ) -> list[Prediction | ServiceError]:
        """Each job's prediction from the member outputs of their concatenated inputs (jobs
        sharing a :attr:`batch_key`): pooled once for the batch, then split, which costs one
        pass of the pooling's many small operations instead of one per job. A job with an
        instance whose prediction is not finite gets a 400 instead, the others their answers."""
        manifest = jobs[0].predictor.manifest
        keep = [job.return_members for job in jobs]
        whole = calibrated_prediction(manifest, outputs, return_members=any(keep))
        parts = split_batch(whole, [len(job.inputs) for job in jobs], keep)
        return [_refuse_non_finite(part) for part in parts]

    def run(self) -> R:
        """Answer the job on its own."""
        (prediction,) = Job.predictions([self], self.member_outputs(self.inputs))
        if isinstance(prediction, ServiceError):
            raise prediction
        return self.encode(prediction)


def _refuse_non_finite(prediction: Prediction) -> Prediction | ServiceError:
    bad = (~finite_instances(prediction)).nonzero().flatten().tolist()
    if not bad:
        return prediction
    return ServiceError(
        400,
        f"the network's outputs for instance {bad[0]} are not finite numbers: its inputs lie "
        "too far outside the data the model was trained on",
    )


FLOAT32_MAX = float(np.finfo(np.float32).max)


@contextmanager
def _within_float32() -> Iterator[None]:
    """Casts to float32 in the block: a number past float32's range is a 400, not an infinity
    that would be refused as if the client had sent one."""
    with np.errstate(over="raise"):
        try:
            yield
        except (FloatingPointError, OverflowError):  # OverflowError: an int past any float
            raise ServiceError(
                400, f"inputs must lie within float32's range (±{FLOAT32_MAX:.4g})"
            ) from None


def float32_array(values: Any) -> np.ndarray:
    """``values`` as a C-contiguous float32 array (see :func:`_within_float32`)."""
    with _within_float32():
        return np.ascontiguousarray(values, dtype=np.float32)


def native_inputs(inputs: JSONArray) -> np.ndarray:
    """The native ``inputs`` as float32, with the values ``np.asarray(json.loads(body)
    ["inputs"], np.float32)`` gives, but JSON numbers only: no ``true``, ``false`` or ``null``
    (the reader already refused strings and objects)."""

    def numbers(values: list[Any]) -> np.ndarray:
        if not inputs.plain and (kinds := {type(v) for v in values} - {int, float}):
            kind = "true/false" if bool in kinds else "null"
            raise ServiceError(400, f"inputs {NOT_AN_ARRAY}, got {kind}")
        # float64 here and float32 in to_numpy round as np.asarray(values, np.float32) does
        return np.fromiter(values, np.float64, len(values))

    with _within_float32():
        return inputs.to_numpy(np.float32, numbers)


class BatchObserver:
    """What :meth:`InferenceService.submit` reports, for a server to record as metrics; this
    one records nothing."""

    def waited(self, model: str, seconds: float) -> None:
        """A job of ``model`` waited ``seconds`` in the queue for its engine run to start."""

    def batch(self, model: str, instances: int, requests: int, seconds: float) -> None:
        """One engine run of ``model`` took ``seconds`` for ``requests`` jobs' ``instances``."""

    def prediction(self, manifest: Manifest, prediction: Prediction) -> None:
        """A job of ``manifest``'s model was answered with ``prediction``."""


class InferenceService:
    """Answers the three doors from one :class:`ModelRepository`.

    Each door has a ``*_job`` method that decodes and validates a request into a :class:`Job`
    (refusing bad ones with a :class:`~serving.errors.ServiceError`) and a method that also runs
    it, alone; :meth:`submit` instead runs jobs batched with those of concurrent callers.
    """

    def __init__(
        self,
        repository: ModelRepository,
        server_version: str = __version__,
        observer: BatchObserver | None = None,
    ) -> None:
        self.repository = repository
        self.server_version = server_version
        self.observer = observer or BatchObserver()
        self._batcher: Batcher[tuple[Job[Any], float], Prediction] = Batcher(self._run_jobs)

    def configure_batching(self, *, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Bound the jobs of one batch and how long a job that finds the engine idle waits."""
        self._batcher.configure(
            max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s
        )

    async def submit(self, job: Job[R]) -> R:
        """Queue ``job`` with those of concurrent callers and answer it once its batch has
        run; raises the job's :class:`~serving.errors.ServiceError`, or its engine run's error."""
        prediction = await self._batcher.submit((job, time.perf_counter()))
        self.observer.prediction(job.predictor.manifest, prediction)
        return job.encode(prediction)

    async def _run_jobs(self, queued: list[tuple[Job[Any], float]]) -> list[Any]:
        """Run queued jobs, one engine call per :attr:`Job.batch_key` group in a worker thread
        (the event loop goes on decoding); each job gets its prediction, or the exception its
        group raised."""
        started = time.perf_counter()
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, (job, enqueued) in enumerate(queued):
            groups[job.batch_key].append(i)
            self.observer.waited(job.predictor.manifest.name, started - enqueued)
        results: list[Any] = [None] * len(queued)
        for indices in groups.values():
            jobs = [queued[i][0] for i in indices]
            inputs = torch.cat([job.inputs for job in jobs])
            begin = time.perf_counter()
            try:
                outputs = await asyncio.to_thread(jobs[0].member_outputs, inputs)
            except Exception as err:  # each job of the group answers with it
                for i in indices:
                    results[i] = err
                continue
            self.observer.batch(
                jobs[0].predictor.manifest.name,
                len(inputs),
                len(jobs),
                time.perf_counter() - begin,
            )
            for i, prediction in zip(indices, Job.predictions(jobs, outputs), strict=True):
                results[i] = prediction
        return results

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(
            name="espro", version=self.server_version, extensions=["binary_tensor_data"]
        )

    @staticmethod
    def job(
        predictor: Predictor,
        x: np.ndarray,
        options: RequestOptions,
        encode: Callable[[Prediction], R],
    ) -> Job[R]:
        """Validate raw instances and options; input problems become 400s that name them."""
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise ServiceError(400, f"inputs must be real numbers, got {x.dtype}")
        tensor = torch.from_numpy(float32_array(x))
        try:
            inputs = predictor.check_inputs(tensor)
            members = tuple(predictor.member_indices(options.draws))
        except InputError as err:
            raise ServiceError(400, str(err)) from None
        return Job(predictor, inputs, members, options.return_members, encode)

    def native_job(self, name: str, body: bytes | bytearray | str) -> Job[bytes]:
        """``POST /v1/models/{name}/predict``: the native JSON request and response.

        ``inputs`` is read as an array of numbers of at most the model's rank plus the batch
        (see :mod:`serving.jsonarray`); the rest is validated strictly, as JSON types: no
        string or boolean for a number, no number for a boolean."""
        predictor = self.repository.get(name)
        rank = len(predictor.manifest.input.shape) + 1
        fields = read_json(
            body.encode() if isinstance(body, str) else body,
            lambda path: rank if path == ("inputs",) else None,
            long_strings=lambda path: path == ("images",),
        )
        inputs = fields.get("inputs") if isinstance(fields, dict) else None
        if isinstance(fields, dict) and "inputs" in fields and "images" in fields:
            raise ServiceError(422, "send inputs or images, not both")
        if isinstance(fields, dict) and "inputs" not in fields and "images" not in fields:
            raise ServiceError(422, "inputs: Field required (or images, base64-encoded)")
        if isinstance(inputs, JSONArray):  # stands in as a list of its length, cut to one item
            fields["inputs"] = [0] * min(len(inputs), 1)
        try:
            request = PredictRequest.model_validate(fields)
        except ValidationError as err:
            raise ServiceError(422, describe_validation_error(err)) from None
        if request.images is not None:
            x = image_inputs(
                predictor, [from_base64(t, f"images[{i}]") for i, t in enumerate(request.images)]
            )
        else:
            assert isinstance(inputs, JSONArray)  # a non-empty list is only ever read as one
            x = native_inputs(inputs)

        def encode(prediction: Prediction) -> bytes:
            response = predict_response(prediction, predictor.bundle)
            return response.model_dump_json(exclude_none=True).encode()

        options = RequestOptions(request.draws, request.return_members)
        return self.job(predictor, x, options, encode)

    def rest_job(
        self, name: str, version: str | None, body: bytes | bytearray, header_length: int | None
    ) -> Job[tuple[bytes, int | None]]:
        """``POST /v2/models/{name}[/versions/{v}]/infer``, JSON or binary extension."""
        predictor = self.repository.get(name, version)
        request, arrays = decode_rest_request(body, header_length)
        requested = [o.name for o in request.outputs]
        binary = binary_outputs(request)
        manifest = predictor.manifest

        def encode(prediction: Prediction) -> tuple[bytes, int | None]:
            tensors = select_outputs(
                prediction_tensors(prediction, manifest.class_names), requested
            )
            return encode_rest_response(
                manifest.name, manifest.version, request.id, tensors, binary, _identity(predictor)
            )

        x = _oip_inputs(predictor, _the_input(arrays))
        return self.job(predictor, x, request_options(request.parameters), encode)

    def grpc_job(self, request: pb.ModelInferRequest) -> Job[pb.ModelInferResponse]:
        """``GRPCInferenceService/ModelInfer``."""
        predictor = self.repository.get(request.model_name, request.model_version)
        parameters, arrays = decode_grpc_request(request)
        requested = [o.name for o in request.outputs]
        manifest = predictor.manifest

        def encode(prediction: Prediction) -> pb.ModelInferResponse:
            tensors = select_outputs(
                prediction_tensors(prediction, manifest.class_names), requested
            )
            return encode_grpc_response(
                manifest.name, manifest.version, request.id, tensors, _identity(predictor)
            )

        return self.job(
            predictor,
            _oip_inputs(predictor, _the_input(arrays)),
            request_options(parameters),
            encode,
        )

    def native(self, name: str, body: bytes | bytearray | str) -> bytes:
        return self.native_job(name, body).run()

    def rest_infer(
        self, name: str, version: str | None, body: bytes | bytearray, header_length: int | None
    ) -> tuple[bytes, int | None]:
        return self.rest_job(name, version, body, header_length).run()

    def grpc_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return self.grpc_job(request).run()


def image_inputs(predictor: Predictor, encoded: Sequence[bytes]) -> np.ndarray:
    """Encoded images as raw instances, decoded with the bundle's own image spec."""
    return decode_images(encoded, _image_spec(predictor)).numpy()


def _image_spec(predictor: Predictor) -> ImageSpec:
    """The bundle's image spec; a bundle without one refuses images (400)."""
    manifest = predictor.manifest
    if manifest.input.image is None:
        raise ServiceError(
            400,
            f"model {quote(manifest.name)} takes real numbers of shape "
            f"{list(manifest.input.shape)}, not images: it was not trained on images",
        )
    return manifest.input.image


def _oip_inputs(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    """The OIP input as numbers: a BYTES tensor ``[N]`` holds one encoded image per element,
    raw in binary data, base64 in JSON (no PNG or JPEG starts like base64 text)."""
    if x.dtype != object:
        return x
    spec = _image_spec(predictor)
    if x.ndim != 1:
        raise ServiceError(
            400, f"input {INPUT!r}: BYTES images take shape [N], got {list(x.shape)}"
        )
    encoded = [
        e if sniff(e) else from_base64(e, f"input {INPUT!r} element {i}")
        for i, e in enumerate(x.tolist())
    ]
    return decode_images(encoded, spec).numpy()


def _identity(predictor: Predictor) -> dict[str, str]:
    """The response parameters naming the exact bundle that answered."""
    return {"bundle_sha256": predictor.bundle.digest}


def _the_input(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The one input tensor an espro model takes."""
    if list(arrays) != [INPUT]:
        got = quote(list(arrays)) if arrays else "none"
        raise ServiceError(400, f"expected exactly one input named {INPUT!r}, got {got}")
    return arrays[INPUT]
