"""The native JSON wire format: what ``POST /v1/models/{name}/predict`` takes and returns.

``espro predict --json`` prints the same response, so the offline and online answers can be
compared field by field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.bundle import Bundle
from serving.predictive import ClassificationPrediction, RegressionPrediction


class PredictRequest(BaseModel):
    """Raw instances (nested lists of numbers, ``[batch, *input_shape]``), or encoded images
    (base64 strings, for a bundle with an image spec), and options.

    Strict, like the OIP doors: ``"2"`` or ``true`` is no integer and ``"yes"`` no boolean.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: list[Any] | None = Field(default=None, min_length=1)
    images: list[str] | None = Field(default=None, min_length=1)
    """PNG or JPEG files, each base64-encoded; decoded as the bundle's training images were."""
    draws: int | None = Field(default=None, ge=1)
    """Draws per simplex to use (default: every draw in the bundle)."""
    return_members: bool = False
    """Also return every member's probabilities (or means and variances)."""

    @model_validator(mode="after")
    def _one_source(self) -> PredictRequest:
        if (self.inputs is None) == (self.images is None):
            raise ValueError("send either inputs or images")
        return self


class ClassInstance(BaseModel):
    """One classified instance."""

    label: int
    class_name: str
    probabilities: list[float]
    confidence: float
    entropy: float
    expected_entropy: float
    mutual_information: float
    disagreement: float
    prediction_set: list[str] | None = None
    """Class names in the conformal prediction set (absent without calibration)."""
    abstain: bool | None = None
    member_probabilities: list[list[float]] | None = None


class RegressionInstance(BaseModel):
    """One regression instance: the moments of the members' Gaussian mixture."""

    mean: float
    variance: float
    aleatoric: float
    epistemic: float
    member_means: list[float] | None = None
    member_variances: list[float] | None = None


class PredictResponse(BaseModel):
    """The answer: which bundle answered, and one record per instance."""

    model_name: str
    model_version: str
    bundle_sha256: str
    predictions: list[ClassInstance] | list[RegressionInstance]


def _column(values: Any, i: int) -> Any:
    return None if values is None else values[:, i].tolist()


def predict_response(
    prediction: ClassificationPrediction | RegressionPrediction, bundle: Bundle
) -> PredictResponse:
    """The wire response for a prediction made with ``bundle``."""
    manifest = bundle.manifest
    records: list[Any]
    if isinstance(prediction, RegressionPrediction):
        records = [
            RegressionInstance(
                mean=float(prediction.mean[i]),
                variance=float(prediction.variance[i]),
                aleatoric=float(prediction.aleatoric[i]),
                epistemic=float(prediction.epistemic[i]),
                member_means=_column(prediction.member_means, i),
                member_variances=_column(prediction.member_variances, i),
            )
            for i in range(len(prediction.mean))
        ]
    else:
        sets, abstain = prediction.prediction_sets, prediction.abstain
        records = [
            ClassInstance(
                label=label,
                class_name=manifest.class_names[label],
                probabilities=prediction.probs[i].tolist(),
                confidence=float(prediction.confidence[i]),
                entropy=float(prediction.entropy[i]),
                expected_entropy=float(prediction.expected_entropy[i]),
                mutual_information=float(prediction.mutual_information[i]),
                disagreement=float(prediction.disagreement[i]),
                prediction_set=None
                if sets is None
                else [manifest.class_names[c] for c in sets[i].nonzero().flatten().tolist()],
                abstain=None if abstain is None else bool(abstain[i]),
                member_probabilities=_column(prediction.member_probs, i),
            )
            for i, label in enumerate(prediction.labels.tolist())
        ]
    return PredictResponse(
        model_name=manifest.name,
        model_version=manifest.version,
        bundle_sha256=bundle.digest,
        predictions=records,
    )
