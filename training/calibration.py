"""Post-hoc calibration on held-out splits: temperature (or variance) scaling, conformal
thresholds and the abstention threshold, all fitted on the pooled ensemble prediction."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from serving.conformal import (
    ConformalMethod,
    abstention_threshold,
    conformal_threshold,
    conformity_scores,
)
from serving.manifest import AbstentionSpec, ConformalSpec
from serving.predictive import gaussian_parameters

LOG_SCALE_BOUND = 10.0
"""Fitted log-scales are clamped to ``±LOG_SCALE_BOUND``."""

PLAUSIBLE_SCALE = (0.1, 10.0)
"""Scales beyond a factor of 10 either way are reported. Temperatures of trained networks are
mostly within 1-3 (Guo et al., 2017); far outside, the fit describes the split, not miscalibration:
a (nearly) perfectly classified split has no interior optimum (NLL falls as T → 0) and members
with no signal drive T up. T divides the logits as s divides the Gaussian's squared error, so
one band serves both."""

Objective = Callable[[torch.Tensor], torch.Tensor]


def _fit_log_scale(objective: Objective, init: float = 0.0, steps: int = 100) -> float:
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
    return float(log_scale.detach().clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND).exp())


def _tempered_nll(member_logits: torch.Tensor, labels: torch.Tensor) -> Objective:
    """NLL of the pooled members ``[S, N, C]`` as a function of log T."""
    logits = member_logits.detach().double()
    index = torch.arange(logits.shape[1])

    def objective(log_t: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits / log_t.exp(), dim=-1)
        pooled = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
        return -pooled[index, labels].mean()

    return objective


def _scaled_mixture_nll(member_outputs: torch.Tensor, targets: torch.Tensor) -> Objective:
    """NLL of the members' Gaussian mixture as a function of the log variance factor."""
    mean, var = gaussian_parameters(member_outputs.detach().double())
    y = targets.double()

    def objective(log_s: torch.Tensor) -> torch.Tensor:
        scaled = var * log_s.exp()
        log_density = -0.5 * (torch.log(2 * math.pi * scaled) + (y - mean) ** 2 / scaled)
        return -(torch.logsumexp(log_density, dim=0) - math.log(mean.shape[0])).mean()

    return objective


def fit_temperature(member_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of the pooled tempered members ``[S, N, C]``."""
    return _fit_log_scale(_tempered_nll(member_logits, labels))


def fit_variance_scale(member_outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The factor on every member's variance minimising the mixture's NLL (regression)."""
    return _fit_log_scale(_scaled_mixture_nll(member_outputs, targets))


def checked_scale(
    objective: Callable[[torch.Tensor, torch.Tensor], Objective],
    fit_outputs: torch.Tensor,
    fit_targets: torch.Tensor,
    check_outputs: torch.Tensor,
    check_targets: torch.Tensor,
    name: str = "scale",
) -> tuple[float, str | None]:
    """A scale fitted on one split and checked on another: ``(scale, warning or None)``.

    A fit split the members classify (almost) perfectly drives T → 0 and the fit says nothing
    about new data, so the scale is kept only if it does not raise the NLL of the second,
    held-out split over the unscaled one; otherwise 1.0 is returned with a warning. A kept
    scale at the search's bound or outside :data:`PLAUSIBLE_SCALE` is kept with a warning.
    """
    scale = _fit_log_scale(objective(fit_outputs, fit_targets))
    check = objective(check_outputs, check_targets)
    with torch.no_grad():
        raw = float(check(torch.tensor(0.0, dtype=torch.float64)))
        scaled = float(check(torch.tensor(math.log(scale), dtype=torch.float64)))
    if not scaled <= raw:  # also rejects a NaN
        return 1.0, (
            f"{name} {scale:.4g} fitted on the fit split raises the check split's NLL from "
            f"{raw:.4f} (unscaled) to {scaled:.4f}: rejected, using 1"
        )
    low, high = PLAUSIBLE_SCALE
    if abs(math.log(scale)) >= LOG_SCALE_BOUND - 1e-9:
        reason = f"at the bound e^±{LOG_SCALE_BOUND:g} of the search"
    elif not low <= scale <= high:
        reason = f"outside the plausible [{low:g}, {high:g}]"
    else:
        return scale, None
    return scale, (
        f"{name} {scale:.4g} is {reason} (check split's NLL {raw:.4f} unscaled, "
        f"{scaled:.4f} scaled): kept, but the members or the fit split may be degenerate"
    )


def checked_temperature(
    fit_logits: torch.Tensor,
    fit_labels: torch.Tensor,
    check_logits: torch.Tensor,
    check_labels: torch.Tensor,
) -> tuple[float, str | None]:
    """:func:`fit_temperature` on member logits ``[S, N, C]``, checked by :func:`checked_scale`."""
    return checked_scale(
        _tempered_nll, fit_logits, fit_labels, check_logits, check_labels, "temperature"
    )


def checked_variance_scale(
    fit_outputs: torch.Tensor,
    fit_targets: torch.Tensor,
    check_outputs: torch.Tensor,
    check_targets: torch.Tensor,
) -> tuple[float, str | None]:
    """:func:`fit_variance_scale` on member outputs ``[S, N, 2]``, checked by
    :func:`checked_scale`."""
    return checked_scale(
        _scaled_mixture_nll,
        fit_outputs,
        fit_targets,
        check_outputs,
        check_targets,
        "variance scale",
    )


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
