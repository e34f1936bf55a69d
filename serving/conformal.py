"""Split conformal prediction sets and the abstention threshold, as pure tensor functions.

Calibration (offline) computes :func:`conformity_scores` on a held-out split of pooled
probabilities and turns them into a threshold with :func:`conformal_threshold`; serving
builds :func:`prediction_sets` from that threshold. Both sides score every class with the
same private function, so a class's score never depends on which side computed it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from serving.checks import check_floating, check_labels
from serving.manifest import ConformalMethod


def _check_fraction(value: float, name: str, *, closed_low: bool = False) -> None:
    low_ok = value >= 0 if closed_low else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"Expected `{name}` in {interval}, but got {value}.")


def _as_method(method: ConformalMethod | str) -> ConformalMethod:
    try:
        return ConformalMethod(method)
    except ValueError:
        expected = ", ".join(repr(m.value) for m in ConformalMethod)
        raise ValueError(
            f"Expected `method` to be one of {expected}, but got {method!r}."
        ) from None


def _class_scores(probs: Tensor, method: ConformalMethod) -> Tensor:
    """Score of every class for every instance, ``[N, C]``: the one definition both sides use."""
    if method is ConformalMethod.LAC:
        return 1 - probs
    # APS: rank classes by probability (descending, ties by class index via a stable sort),
    # total the probability ranked above each, and scatter it back to its class's column.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    above = sorted_probs.cumsum(dim=-1) - sorted_probs
    return torch.empty_like(probs).scatter_(-1, order, above)


def conformity_scores(probs: Tensor, labels: Tensor, method: ConformalMethod | str) -> Tensor:
    """Score of each instance's true class, ``[N]``, from pooled probabilities ``[N, C]``."""
    method = _as_method(method)
    check_floating(probs, "probs", ndim=2)
    check_labels(labels, probs)
    return _class_scores(probs, method).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def conformal_threshold(scores: Tensor, coverage: float) -> float:
    """Split-conformal threshold: the ``ceil((n + 1) * coverage)``-th smallest of ``n`` scores.

    Sets built with it contain the true class with probability at least ``coverage`` on
    exchangeable data. When that rank exceeds ``n`` (too few calibration points for the
    coverage asked) the threshold is ``+inf`` and every set holds every class.
    ``coverage`` is read as the decimal it prints as, so ``(n + 1) * 0.28`` with ``n = 24`` is
    exactly 7, not ``7.000000000000001`` rounded up to 8.
    """
    _check_fraction(coverage, "coverage")
    if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.numel() == 0:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"Expected `scores` to be a non-empty 1-D tensor, but got {shape}.")
    n = scores.numel()
    rank = math.ceil((n + 1) * Fraction(repr(float(coverage))))
    if rank > n:
        return math.inf
    return float(torch.kthvalue(scores, rank).values)


def prediction_sets(probs: Tensor, threshold: float, method: ConformalMethod | str) -> Tensor:
    """Boolean sets ``[B, C]``: class ``y`` is in the set iff its score is ``<= threshold``."""
    method = _as_method(method)
    check_floating(probs, "probs", ndim=2)
    if math.isnan(threshold):
        raise ValueError("Expected `threshold` to be a number or +inf, but got nan.")
    return _class_scores(probs, method) <= threshold


def abstention_threshold(confidence: Tensor, correct: Tensor, target_error: float) -> float:
    """Lowest confidence to answer at, so that the calibration error among answers is bounded.

    Returns the smallest threshold ``t`` (one of the calibration confidences) such that the
    error rate among calibration points with ``confidence >= t`` is at most ``target_error``;
    this keeps as many points as possible. Points with equal confidence are kept or dropped
    together. Serve by abstaining when ``confidence < t``. If no ``t`` achieves the target,
    returns ``+inf``, which is above every confidence: abstain on everything.
    """
    _check_fraction(target_error, "target_error", closed_low=True)
    check_floating(confidence, "confidence", ndim=1)
    if not isinstance(correct, Tensor) or correct.dtype != torch.bool:
        got = correct.dtype if isinstance(correct, Tensor) else type(correct).__name__
        raise TypeError(f"Expected `correct` to be a bool tensor, but got {got}.")
    if correct.shape != confidence.shape:
        raise ValueError(
            f"Expected `correct` to have the shape of `confidence` {tuple(confidence.shape)}, "
            f"but got {tuple(correct.shape)}."
        )
    sorted_conf, order = torch.sort(confidence, descending=True, stable=True)
    errors = (~correct[order]).cumsum(0, dtype=torch.float64)
    kept = torch.arange(1, errors.numel() + 1, dtype=torch.float64, device=errors.device)
    # A threshold keeps whole groups of ties, so only the last position of each group counts.
    group_end = torch.ones_like(sorted_conf, dtype=torch.bool)
    group_end[:-1] = sorted_conf[:-1] != sorted_conf[1:]
    feasible = (group_end & (errors / kept <= target_error)).nonzero()
    if feasible.numel() == 0:
        return math.inf
    return float(sorted_conf[feasible[-1, 0]])
