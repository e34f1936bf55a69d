"""The predictive math, one implementation for the server and the trainer's evaluation.

Ensemble members (every draw of every simplex) are stacked on dim 0: classification logits
are ``[S, B, C]``, regression outputs ``[S, B, 2]`` (mean, raw scale). Members are pooled in
probability space, so for the tempered members total entropy = expected entropy + mutual
information. Entropies are in nats, with ``0 · log 0 = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from serving.checks import check_floating
from serving.conformal import prediction_sets
from serving.manifest import ConformalMethod

MIN_VARIANCE = 1e-6
"""Added to ``softplus(raw scale)`` so a member's variance is never zero."""


def _check_positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value}.")


def member_probabilities(member_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Each member's tempered class probabilities ``softmax(logits / T)``, ``[S, B, C]``."""
    check_floating(member_logits, "member_logits", ndim=3)
    _check_positive(temperature, "temperature")
    return torch.softmax(member_logits / temperature, dim=-1)


def pool(member_probs: Tensor) -> Tensor:
    """The ensemble's predictive distribution: the mean of the member probabilities, ``[B, C]``."""
    check_floating(member_probs, "member_probs", ndim=3)
    return member_probs.mean(dim=0)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dimension; zero probabilities contribute zero."""
    check_floating(probs, "probs")
    return torch.special.entr(probs).sum(dim=-1)


def expected_entropy(member_probs: Tensor) -> Tensor:
    """Aleatoric uncertainty: the mean over members of each member's entropy, ``[B]``."""
    check_floating(member_probs, "member_probs", ndim=3)
    return entropy(member_probs).mean(dim=0)


def mutual_information(member_probs: Tensor) -> Tensor:
    """Epistemic uncertainty: entropy of the pool minus the expected entropy, ``[B]``.

    Clamped at zero, which it can only cross by rounding (entropy is concave).
    """
    return (entropy(pool(member_probs)) - expected_entropy(member_probs)).clamp_min(0)


def disagreement(member_probs: Tensor) -> Tensor:
    """Fraction of members whose top class differs from the pool's top class, ``[B]``.

    Ties go to the lowest class index, for members and pool alike.
    """
    pooled_label = pool(member_probs).argmax(dim=-1)
    return (member_probs.argmax(dim=-1) != pooled_label).to(member_probs.dtype).mean(dim=0)


@dataclass(frozen=True)
class ClassificationPrediction:
    """A pooled classification with its uncertainty; ``B`` instances, ``C`` classes."""

    probs: Tensor
    """Pooled probabilities ``[B, C]``."""
    labels: Tensor
    """Top class ``[B]`` (lowest index on ties)."""
    confidence: Tensor
    """Top pooled probability ``[B]``."""
    entropy: Tensor
    """Total uncertainty: entropy of the pool, nats ``[B]``."""
    expected_entropy: Tensor
    """Aleatoric part: mean member entropy, nats ``[B]``."""
    mutual_information: Tensor
    """Epistemic part: entropy minus expected entropy, nats ``[B]``."""
    disagreement: Tensor
    """Fraction of members whose top class is not the pool's ``[B]``."""
    prediction_sets: Tensor | None = None
    """Conformal sets, bool ``[B, C]``; ``None`` without a conformal threshold."""
    abstain: Tensor | None = None
    """bool ``[B]``: confidence below the abstention threshold; ``None`` without one."""
    member_probs: Tensor | None = None
    """Tempered member probabilities ``[S, B, C]``, only when asked for."""


def classify(
    member_logits: Tensor,
    *,
    temperature: float = 1.0,
    conformal_method: ConformalMethod | str | None = None,
    conformal_threshold: float | None = None,
    abstain_below: float | None = None,
    return_members: bool = False,
) -> ClassificationPrediction:
    """Pool tempered member logits ``[S, B, C]`` into a prediction with its uncertainty.

    Prediction sets need both ``conformal_method`` and ``conformal_threshold`` (from
    :mod:`serving.conformal`); an instance abstains when its confidence is below
    ``abstain_below`` (``+inf`` abstains on everything).
    """
    if (conformal_method is None) != (conformal_threshold is None):
        raise ValueError(
            "Expected `conformal_method` and `conformal_threshold` to be given together, but got "
            f"method={conformal_method!r} and threshold={conformal_threshold!r}."
        )
    if abstain_below is not None and math.isnan(abstain_below):
        raise ValueError("Expected `abstain_below` to be a number or None, but got nan.")
    member_probs = member_probabilities(member_logits, temperature)
    probs = pool(member_probs)
    confidence, labels = probs.max(dim=-1)
    return ClassificationPrediction(
        probs=probs,
        labels=labels,
        confidence=confidence,
        entropy=entropy(probs),
        expected_entropy=expected_entropy(member_probs),
        mutual_information=mutual_information(member_probs),
        disagreement=disagreement(member_probs),
        prediction_sets=(
            None
            if conformal_method is None
            else prediction_sets(probs, conformal_threshold, conformal_method)
        ),
        abstain=None if abstain_below is None else confidence < abstain_below,
        member_probs=member_probs if return_members else None,
    )


def gaussian_parameters(outputs: Tensor) -> tuple[Tensor, Tensor]:
    """Split network outputs ``[..., 2]`` into a mean and a variance ``softplus(raw) + 1e-6``."""
    check_floating(outputs, "outputs")
    if outputs.shape[-1] != 2:
        raise ValueError(
            "Expected `outputs` of shape [..., 2] (mean, raw scale), "
            f"but got {tuple(outputs.shape)}."
        )
    return outputs[..., 0], F.softplus(outputs[..., 1]) + MIN_VARIANCE


@dataclass(frozen=True)
class RegressionPrediction:
    """The Gaussian-mixture prediction of the members, moment-matched; ``B`` instances."""

    mean: Tensor
    """Mixture mean ``[B]``."""
    variance: Tensor
    """Mixture variance ``[B]`` = aleatoric + epistemic."""
    aleatoric: Tensor
    """Mean of the (scaled) member variances ``[B]``."""
    epistemic: Tensor
    """Variance of the member means ``[B]``."""
    member_means: Tensor | None = None
    """Member means ``[S, B]``, only when asked for."""
    member_variances: Tensor | None = None
    """Scaled member variances ``[S, B]``, only when asked for."""


def regress(
    member_outputs: Tensor, *, variance_scale: float = 1.0, return_members: bool = False
) -> RegressionPrediction:
    """Moment-match the mixture of member Gaussians from outputs ``[S, B, 2]``.

    ``variance_scale`` multiplies every member's variance (the regression analogue of
    temperature); it does not touch the spread of the member means.
    """
    check_floating(member_outputs, "member_outputs", ndim=3)
    _check_positive(variance_scale, "variance_scale")
    means, variances = gaussian_parameters(member_outputs)
    variances = variances * variance_scale
    aleatoric = variances.mean(dim=0)
    epistemic = means.var(dim=0, correction=0)  # two-pass: no E[μ²] − E[μ]² cancellation
    return RegressionPrediction(
        mean=means.mean(dim=0),
        variance=aleatoric + epistemic,
        aleatoric=aleatoric,
        epistemic=epistemic,
        member_means=means if return_members else None,
        member_variances=variances if return_members else None,
    )


P = TypeVar("P", ClassificationPrediction, RegressionPrediction)


def split_batch(prediction: P, sizes: Sequence[int], keep_members: Sequence[bool]) -> list[P]:
    """The predictions of consecutive parts of ``sizes`` instances of a batch's ``prediction``,
    each with its member outputs (``member_*``, ``[S, B, ...]``) only where ``keep_members``
    says so. Pooling is per instance, so each equals the prediction of its part alone."""
    if len(sizes) != len(keep_members):
        raise ValueError(f"Expected one keep_members flag per part, got {len(keep_members)}.")
    parts: dict[str, Sequence[Tensor | None]] = {}
    for field in fields(prediction):
        value = getattr(prediction, field.name)
        members = field.name.startswith("member_")
        split = None if value is None else value.split(list(sizes), dim=1 if members else 0)
        parts[field.name] = [None] * len(sizes) if split is None else split
    return [
        replace(
            prediction,
            **{
                name: None if name.startswith("member_") and not keep else values[i]
                for name, values in parts.items()
            },
        )
        for i, keep in enumerate(keep_members)
    ]


def finite_instances(prediction: ClassificationPrediction | RegressionPrediction) -> Tensor:
    """Which instances ``[B]`` have finite numbers in every pooled field: inputs far outside
    the training data can drive a network's outputs past float32, and the pool to NaN."""
    rows = [
        torch.isfinite(value).reshape(len(value), -1).all(1)
        for field in fields(prediction)
        if not field.name.startswith("member_")
        and (value := getattr(prediction, field.name)) is not None
        and value.is_floating_point()
    ]
    return torch.stack(rows).all(0)
