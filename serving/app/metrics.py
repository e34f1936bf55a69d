"""The server's Prometheus metrics, recorded through Ray's metrics API.

Ray exports them, prefixed ``ray_`` and tagged with the Serve deployment, replica and
application, from every node's metrics endpoint (``http://NODE:8080/metrics`` with
``espro serve``'s default ``--metrics-port``). ``docs/serving.md`` says what each one means.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from ray.serve import metrics

from serving.manifest import Manifest
from serving.predictive import ClassificationPrediction
from serving.predictor import Prediction, Predictor
from serving.service import BatchObserver

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
UNIT_BOUNDARIES = [round(0.05 * i, 2) for i in range(1, 21)]
ENTROPY_BOUNDARIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]


class ServerMetrics(BatchObserver):
    """Every metric a replica records; one instance per replica, also the observer of its
    service's batches and answers."""

    def __init__(self) -> None:
        door = ("door", "model", "status")
        self.requests = metrics.Counter(
            "espro_requests_total",
            "Requests answered, by door (native, rest, grpc; *-direct past Serve), model, status.",
            tag_keys=door,
        )
        self.latency = metrics.Histogram(
            "espro_request_latency_seconds",
            "Time from the replica receiving a request to its answer, by door, model, status.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=door,
        )
        self.batch_instances = metrics.Histogram(
            "espro_batch_instances",
            "Instances (rows) in one engine run: how well requests are batched.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model",),
        )
        self.batch_requests = metrics.Histogram(
            "espro_batch_requests",
            "Requests sharing one engine run.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model",),
        )
        self.queue_wait = metrics.Histogram(
            "espro_queue_wait_seconds",
            "Time a decoded request waits for its engine run to start.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.engine = metrics.Histogram(
            "espro_engine_seconds",
            "Time of one engine run: every member's forward pass over the batch.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        version = ("model", "version")
        self.entropy = metrics.Histogram(
            "espro_predictive_entropy_nats",
            "Entropy of each answered instance's predictive distribution.",
            boundaries=ENTROPY_BOUNDARIES,
            tag_keys=version,
        )
        self.mutual_information = metrics.Histogram(
            "espro_mutual_information_nats",
            "Mutual information (epistemic uncertainty) of each answered instance.",
            boundaries=ENTROPY_BOUNDARIES,
            tag_keys=version,
        )
        self.confidence = metrics.Histogram(
            "espro_confidence",
            "Top-class probability of each answered instance.",
            boundaries=UNIT_BOUNDARIES,
            tag_keys=version,
        )
        self.instances = metrics.Counter(
            "espro_instances_total", "Instances answered.", tag_keys=version
        )
        self.abstentions = metrics.Counter(
            "espro_abstentions_total",
            "Instances flagged to abstain (confidence under the calibrated threshold).",
            tag_keys=version,
        )
        self.bundles_refused = metrics.Gauge(
            "espro_bundles_refused",
            "Bundles of the replica's configuration that failed to load; it serves the others.",
        )
        self.model_info = metrics.Gauge(
            "espro_model_info",
            "1 for each model version a replica serves, with its bundle hash.",
            tag_keys=("model", "version", "bundle_sha256"),
        )
        self.engine_info = metrics.Gauge(
            "espro_engine_info",
            "1 for the engine answering each range of batch rows of a model version.",
            tag_keys=("model", "version", "batch_range", "engine"),
        )

    def request(self, door: str, model: str, status: int, seconds: float) -> None:
        tags = {"door": door, "model": model, "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe(seconds, tags=tags)

    def waited(self, model: str, seconds: float) -> None:
        self.queue_wait.observe(seconds, tags={"model": model})

    def batch(self, model: str, instances: int, requests: int, seconds: float) -> None:
        tags = {"model": model}
        self.batch_instances.observe(instances, tags=tags)
        self.batch_requests.observe(requests, tags=tags)
        self.engine.observe(seconds, tags=tags)

    def prediction(self, manifest: Manifest, prediction: Prediction) -> None:
        """The uncertainty drift signal: one observation per answered instance."""
        tags = {"model": manifest.name, "version": manifest.version}
        if not isinstance(prediction, ClassificationPrediction):
            self.instances.inc(len(prediction.mean), tags=tags)
            return
        for histogram, values in (
            (self.entropy, prediction.entropy),
            (self.mutual_information, prediction.mutual_information),
            (self.confidence, prediction.confidence),
        ):
            for value in values.tolist():
                histogram.observe(value, tags=tags)
        self.instances.inc(len(prediction.labels), tags=tags)
        if prediction.abstain is not None and (
            count := int(torch.count_nonzero(prediction.abstain))
        ):
            self.abstentions.inc(count, tags=tags)

    def models(self, served: Iterable[Predictor], refused: int) -> None:
        """Refresh the model-info gauge (1 for each bundle served), the engine-info gauge (1
        for each range of batch rows and its engine) and the count of refused bundles. Ray
        drops a gauge series that is not refreshed for two report intervals, so a replaced
        bundle's series end."""
        self.bundles_refused.set(float(refused))
        for predictor in served:
            manifest = predictor.manifest
            tags = {"model": manifest.name, "version": manifest.version}
            self.model_info.set(1.0, tags=tags | {"bundle_sha256": predictor.bundle.digest})
            for batch_range, engine in predictor.engine_choice.items():
                self.engine_info.set(
                    1.0, tags=tags | {"batch_range": batch_range, "engine": engine}
                )
