"""What the client returns: predictions as numpy arrays, and what the server says it serves."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from espro_client.errors import EsproError


@dataclass(frozen=True)
class Prediction:
    """Calibrated predictions for a batch of ``B`` instances over ``C`` classes.

    Every protocol fills the same fields with the same numbers, except where it does not
    carry a value (see docs/client.md): ``prediction_set_names`` come only from the
    ``native`` protocol, and ``prediction_sets`` only from the OIP ones.
    """

    probabilities: np.ndarray
    """Float32 ``[B, C]``: the calibrated ensemble probabilities."""
    labels: np.ndarray
    """Int64 ``[B]``: the most probable class."""
    confidence: np.ndarray
    """Float32 ``[B]``: the probability of ``labels``."""
    entropy: np.ndarray
    """Float32 ``[B]``: predictive entropy (nats), total uncertainty."""
    expected_entropy: np.ndarray
    """Float32 ``[B]``: the members' mean entropy, the aleatoric part."""
    mutual_information: np.ndarray
    """Float32 ``[B]``: ``entropy - expected_entropy``, the epistemic part."""
    disagreement: np.ndarray
    """Float32 ``[B]``: the share of members whose label differs from ``labels``."""
    model_name: str
    model_version: str
    bundle_sha256: str | None = None
    """The hash of the bundle that answered (every protocol carries it)."""
    class_names: np.ndarray | None = None
    """Str ``[B]``: the name of each label (``native`` protocol only)."""
    prediction_sets: np.ndarray | None = None
    """Bool ``[B, C]``: the conformal prediction sets (OIP protocols, calibrated bundles)."""
    prediction_set_names: list[list[str]] | None = None
    """The class names in each prediction set (``native`` protocol, calibrated bundles)."""
    abstain: np.ndarray | None = None
    """Bool ``[B]``: whether to abstain on each instance (bundles with an abstention rule)."""
    member_probabilities: np.ndarray | None = None
    """Float32 ``[B, S, C]``: every member's probabilities, when asked for."""

    def __len__(self) -> int:
        return len(self.labels)


def concatenate(parts: list[Prediction]) -> Prediction:
    """One prediction from the predictions of consecutive chunks of one batch."""
    first = parts[0]
    for part in parts[1:]:
        if (part.model_name, part.model_version) != (first.model_name, first.model_version):
            raise EsproError(
                f"the chunks of one batch were answered by {first.model_name}:"
                f"{first.model_version} and {part.model_name}:{part.model_version} "
                "(a new version was deployed meanwhile); send the batch again"
            )
    values = {}
    for field in fields(Prediction):
        column = [getattr(part, field.name) for part in parts]
        if isinstance(column[0], np.ndarray):
            values[field.name] = np.concatenate(column)
        elif isinstance(column[0], list):
            values[field.name] = [item for chunk in column for item in chunk]
        else:
            values[field.name] = column[0]
    return Prediction(**values)


@dataclass(frozen=True)
class ModelVersion:
    """One served version of a model and the hash of its bundle."""

    version: str
    bundle_sha256: str


@dataclass(frozen=True)
class Model:
    """A served model and its versions, oldest first (the last one answers by default)."""

    name: str
    versions: list[ModelVersion]


@dataclass(frozen=True)
class TensorSpec:
    """An input or output tensor; ``-1`` marks a dimension of any size (the batch)."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    """A model's OIP metadata: its versions and tensor signatures."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
