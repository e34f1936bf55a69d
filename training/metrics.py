"""Evaluation metrics on pooled predictions, as pure tensor functions returning floats.

Classification metrics take pooled probabilities ``[N, C]`` and integer labels ``[N]``
(see :func:`serving.predictive.pool`); regression metrics take the members' Gaussians
``[S, N]`` and targets ``[N]``. Probabilities are not renormalised.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from serving.checks import check_floating, check_labels


def _checked(probs: Tensor, labels: Tensor) -> Tensor:
    """Check a classification batch; return the labels as ``int64`` for indexing."""
    check_floating(probs, "probs", ndim=2)
    check_labels(labels, probs)
    return labels.long()


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of instances whose top class (lowest index on ties) is the label."""
    labels = _checked(probs, labels)
    return float((probs.argmax(dim=-1) == labels).double().mean())


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-probability of the label, in nats.

    The label's probability is floored at the smallest normal number of its dtype, so a
    probability of exactly 0 costs a finite ``-log(tiny)`` (about 87 nats in float32, 708 in
    float64) instead of ``inf``; any probability a softmax can represent is left untouched.
    """
    labels = _checked(probs, labels)
    p_label = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return float(-p_label.clamp_min(torch.finfo(probs.dtype).tiny).log().double().mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over instances of the squared distance between ``probs`` and the one-hot label."""
    labels = _checked(probs, labels)
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return float((probs - one_hot).square().sum(dim=-1).double().mean())


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top class over ``n_bins`` equal-width bins.

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]``; the result is
    ``Σ_b (n_b / N) |accuracy_b − mean confidence_b|``.
    """
    labels = _checked(probs, labels)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"Expected `n_bins` to be a positive int, but got {n_bins!r}.")
    confidence, predicted = probs.double().max(dim=-1)
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)[1:-1]
    bins = torch.bucketize(confidence, inner_edges)
    gap = (predicted == labels).double() - confidence
    per_bin = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, gap)
    return float(per_bin.abs().sum() / labels.numel())


def aurc(probs: Tensor, labels: Tensor) -> float:
    """Area under the risk-coverage curve: mean over ``k`` of the error rate of the ``k`` most
    confident instances (confidence = top pooled probability). Lower is better.

    Instances with equal confidence have no order, so within a tie the errors are spread
    evenly (the expectation over random tie-breaking): the value does not depend on the order
    of the data, even when many probabilities saturate at exactly 1.
    """
    labels = _checked(probs, labels)
    confidence, predicted = probs.max(dim=-1)
    sorted_conf, order = torch.sort(confidence, descending=True)
    errors = (predicted != labels)[order].double()
    _, group, group_size = torch.unique_consecutive(
        sorted_conf, return_inverse=True, return_counts=True
    )
    group_end = group_size.cumsum(0)
    errors_through_group = errors.cumsum(0)[group_end - 1]
    group_errors = errors_through_group.diff(prepend=errors_through_group.new_zeros(1))
    seen = torch.arange(1, errors.numel() + 1, dtype=torch.float64, device=errors.device)
    seen_in_group = seen - (group_end - group_size)[group]
    expected_errors = (errors_through_group - group_errors)[group] + seen_in_group * (
        group_errors / group_size
    )[group]
    return float((expected_errors / seen).mean())


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Every classification metric: ``accuracy``, ``nll``, ``brier``, ``ece``, ``aurc``."""
    return {metric.__name__: metric(probs, labels) for metric in (accuracy, nll, brier, ece, aurc)}


def gaussian_mixture_nll(member_means: Tensor, member_variances: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood of ``targets [N]`` under the equal-weight mixture of the
    members' Gaussians ``N(μ_s, σ²_s)``, means and variances ``[S, N]``; logsumexp-stable."""
    check_floating(member_means, "member_means", ndim=2)
    check_floating(member_variances, "member_variances", ndim=2)
    check_floating(targets, "targets", ndim=1)
    if member_variances.shape != member_means.shape or targets.shape != member_means.shape[1:]:
        raise ValueError(
            "Expected `member_means` and `member_variances` of shape [S, N] and `targets` of "
            f"shape [N], but got {tuple(member_means.shape)}, {tuple(member_variances.shape)} "
            f"and {tuple(targets.shape)}."
        )
    if not bool((member_variances > 0).all()):
        raise ValueError("Expected `member_variances` to be positive, but got a value <= 0.")
    means, variances, targets = member_means.double(), member_variances.double(), targets.double()
    log_densities = -0.5 * (
        math.log(2 * math.pi) + variances.log() + (targets - means).square() / variances
    )
    log_mixture = torch.logsumexp(log_densities, dim=0) - math.log(means.shape[0])
    return float(-log_mixture.mean())


def rmse(mean: Tensor, targets: Tensor) -> float:
    """Root mean squared error of the predicted ``mean [N]`` against ``targets [N]``."""
    check_floating(mean, "mean", ndim=1)
    check_floating(targets, "targets", ndim=1)
    if mean.shape != targets.shape:
        raise ValueError(
            f"Expected `mean` and `targets` of the same shape, but got {tuple(mean.shape)} and "
            f"{tuple(targets.shape)}."
        )
    return float((mean.double() - targets.double()).square().mean().sqrt())


def regression_metrics(
    member_means: Tensor, member_variances: Tensor, targets: Tensor
) -> dict[str, float]:
    """``nll`` of the Gaussian mixture and ``rmse`` of its mean (the mean of the member means)."""
    return {
        "nll": gaussian_mixture_nll(member_means, member_variances, targets),
        "rmse": rmse(member_means.mean(dim=0), targets),
    }
