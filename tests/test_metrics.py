"""Tests for training.metrics against hand-computed values, netcal and NumPy/SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from netcal.metrics import ECE
from scipy.stats import norm

from training.metrics import (
    accuracy,
    aurc,
    brier,
    classification_metrics,
    ece,
    gaussian_mixture_nll,
    nll,
    regression_metrics,
    rmse,
)

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.0, 0.05, 0.95]])
LABELS = torch.tensor([0, 2, 2, 2])  # right, wrong, right, right


def test_accuracy_by_hand():
    assert accuracy(PROBS, LABELS) == pytest.approx(0.75)


def test_nll_by_hand_and_at_zero_probability():
    expected = -(math.log(0.7) + math.log(0.4) + math.log(0.4) + math.log(0.95)) / 4
    assert nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-6)
    zero = nll(PROBS[3:], torch.tensor([0]))
    assert math.isfinite(zero)
    assert zero == pytest.approx(-math.log(torch.finfo(torch.float32).tiny), rel=1e-6)


def test_brier_by_hand():
    per_row = [
        0.3**2 + 0.2**2 + 0.1**2,
        0.1**2 + 0.5**2 + 0.6**2,
        0.3**2 + 0.3**2 + 0.6**2,
        0.0 + 0.05**2 + 0.05**2,
    ]
    assert brier(PROBS, LABELS) == pytest.approx(sum(per_row) / 4, rel=1e-6)


def test_ece_by_hand():
    # 3 bins: conf 0.7 (bin 2, right), 0.5 (bin 1, wrong), 0.4 (bin 1, right), 0.95 (bin 2, right)
    bin_1 = 2 / 4 * abs(0.5 - (0.5 + 0.4) / 2)
    bin_2 = 2 / 4 * abs(1.0 - (0.7 + 0.95) / 2)
    assert ece(PROBS, LABELS, n_bins=3) == pytest.approx(bin_1 + bin_2, rel=1e-6)


def test_ece_bins_are_closed_on_the_right():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 1])  # conf 0.5 right, conf 0.9 wrong
    # with 2 bins, 0.5 sits alone in (0, 0.5]: (|1 - 0.5| + |0 - 0.9|) / 2, not |0.5 - 0.7|
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.7)
    assert ece(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 0]), n_bins=2) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_netcal(seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(2000, 5, generator=generator), dim=-1).double()
    labels = torch.randint(0, 5, (2000,), generator=generator)
    reference = ECE(bins=15).measure(probs.numpy(), labels.numpy())
    assert ece(probs, labels) == pytest.approx(reference, rel=1e-9, abs=1e-12)


def test_aurc_perfect_versus_reversed_ranking():
    # 2 errors in 5; a perfect ranking puts them last, a reversed one first
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55])
    probs = torch.stack([confidence, 1 - confidence], dim=-1)
    perfect = aurc(probs, torch.tensor([0, 0, 0, 1, 1]))
    reversed_ = aurc(probs, torch.tensor([1, 1, 0, 0, 0]))
    assert perfect == pytest.approx((0 + 0 + 0 + 1 / 4 + 2 / 5) / 5)
    assert reversed_ == pytest.approx((1 + 1 + 2 / 3 + 2 / 4 + 2 / 5) / 5)
    assert perfect < reversed_


def test_aurc_spreads_errors_over_ties():
    probs = torch.tensor([[1.0, 0.0]] * 4)
    labels = torch.tensor([1, 0, 0, 0])
    # whatever the order, tied instances share the error rate 1/4
    assert aurc(probs, labels) == pytest.approx(0.25)
    assert aurc(probs, labels.flip(0)) == pytest.approx(0.25)


def test_classification_metrics_has_every_metric():
    metrics = classification_metrics(PROBS, LABELS)
    assert metrics == {
        "accuracy": accuracy(PROBS, LABELS),
        "nll": nll(PROBS, LABELS),
        "brier": brier(PROBS, LABELS),
        "ece": ece(PROBS, LABELS),
        "aurc": aurc(PROBS, LABELS),
    }


def test_gaussian_mixture_nll_against_scipy():
    rng = np.random.default_rng(0)
    means, variances = rng.normal(size=(3, 50)), rng.uniform(0.1, 2.0, size=(3, 50))
    targets = rng.normal(size=50)
    density = norm.pdf(targets, loc=means, scale=np.sqrt(variances)).mean(axis=0)
    result = gaussian_mixture_nll(*map(torch.from_numpy, (means, variances, targets)))
    assert result == pytest.approx(-np.log(density).mean(), rel=1e-10)


def test_gaussian_mixture_nll_is_finite_far_in_the_tails():
    means = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    variances = torch.full((2, 1), 1e-4, dtype=torch.float64)
    far = gaussian_mixture_nll(means, variances, torch.tensor([100.0], dtype=torch.float64))
    # the nearer member dominates: -log(0.5 N(100; 1, 1e-4))
    expected = math.log(2) + 0.5 * math.log(2 * math.pi * 1e-4) + 99.0**2 / (2 * 1e-4)
    assert far == pytest.approx(expected, rel=1e-9)


def test_rmse_and_regression_metrics_by_hand():
    assert rmse(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(math.sqrt(2.5))
    means = torch.tensor([[0.0, 2.0], [2.0, 4.0]])  # mixture means 1 and 3
    variances = torch.ones(2, 2)
    targets = torch.tensor([1.0, 1.0])
    metrics = regression_metrics(means, variances, targets)
    assert metrics["rmse"] == pytest.approx(math.sqrt(2.0))
    assert metrics["nll"] == pytest.approx(gaussian_mixture_nll(means, variances, targets))
    assert set(metrics) == {"nll", "rmse"}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: accuracy(PROBS, LABELS[:3]), ValueError, r"shape \(4,\)"),
        (lambda: nll(PROBS, LABELS + 1), ValueError, r"\[0, 2\]"),
        (lambda: brier(PROBS[0], LABELS), ValueError, "2 dimension"),
        (lambda: ece(PROBS, LABELS, n_bins=0), ValueError, "n_bins"),
        (lambda: aurc(PROBS, LABELS.bool()), TypeError, "integer"),
        (
            lambda: gaussian_mixture_nll(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)),
            ValueError,
            r"\[S, N\]",
        ),
        (
            lambda: gaussian_mixture_nll(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3)),
            ValueError,
            "positive",
        ),
        (lambda: rmse(torch.zeros(3), torch.zeros(2)), ValueError, "same shape"),
    ],
)
def test_argument_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()
