"""Post-hoc calibration on held-out splits: temperature (or variance) scaling, conformal
thresholds and the abstention threshold, all fitted on the pooled ensemble prediction."""

from __future__ import annotations

import math

import torch

from serving.conformal import (
    ConformalMethod,
    abstention_threshold,
    conformal_threshold,
    conformity_scores,
)
from serving.manifest import AbstentionSpec, ConformalSpec
from serving.predictive import gaussian_parameters


def _fit_log_scale(objective, init: float = 0.0, steps: int = 100) -> float:
    """Minimise a scalar objective of a log-scale with L-BFGS; return the scale."""
    log_scale = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [log_scale], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = objective(log_scale)
        value.backward()
        return value

    optimiser.step(closure)
    return float(log_scale.detach().clamp(-10.0, 10.0).exp())


def fit_temperature(member_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of the pooled tempered members ``[S, N, C]``."""
    logits = member_logits.detach().double()
    n = logits.shape[1]

    def pooled_nll(log_t: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits / log_t.exp(), dim=-1)
        pooled = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
        return -pooled[torch.arange(n), labels].mean()

    return _fit_log_scale(pooled_nll)


def fit_variance_scale(member_outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The factor on every member's variance minimising the mixture's NLL (regression)."""
    mean, var = gaussian_parameters(member_outputs.detach().double())
    y = targets.double()

    def mixture_nll(log_s: torch.Tensor) -> torch.Tensor:
        scaled = var * log_s.exp()
        log_density = -0.5 * (torch.log(2 * math.pi * scaled) + (y - mean) ** 2 / scaled)
        return -(torch.logsumexp(log_density, dim=0) - math.log(mean.shape[0])).mean()

    return _fit_log_scale(mixture_nll)


def calibrate_conformal(
    probs: torch.Tensor, labels: torch.Tensor, method: ConformalMethod | str, coverage: float
) -> ConformalSpec:
    """Split conformal threshold on a calibration split of pooled probabilities."""
    threshold = conformal_threshold(conformity_scores(probs, labels, method), coverage)
    return ConformalSpec(
        method=ConformalMethod(method),
        coverage=coverage,
        threshold=threshold if math.isfinite(threshold) else None,
        num_calibration=len(labels),
    )


def calibrate_abstention(
    probs: torch.Tensor, labels: torch.Tensor, target_error: float
) -> AbstentionSpec:
    """Confidence threshold that keeps the selective error at or below ``target_error``."""
    confidence, predicted = probs.max(dim=-1)
    correct = predicted == labels
    threshold = abstention_threshold(confidence, correct, target_error)
    return AbstentionSpec(
        target_error=target_error,
        threshold=threshold if math.isfinite(threshold) else None,
        calibration_coverage=float((confidence >= threshold).double().mean()),
    )
