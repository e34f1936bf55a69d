import math
import re

import pytest
import torch

from serving.conformal import prediction_sets
from serving.manifest import ConformalMethod
from serving.predictive import member_probabilities, pool
from training.calibration import (
    calibrate_abstention,
    calibrate_conformal,
    checked_temperature,
    checked_variance_scale,
    fit_temperature,
    fit_variance_scale,
)
from training.metrics import gaussian_mixture_nll, nll


def _overconfident(n: int = 4000, sharpen: float = 4.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, 5, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    members = torch.stack(
        [sharpen * true_logits + 0.1 * torch.randn(n, 5, generator=g) for _ in range(3)]
    )
    return members, labels


def test_temperature_fitting_lowers_the_nll_of_an_overconfident_model():
    members, labels = _overconfident()
    t = fit_temperature(members, labels)
    assert t == pytest.approx(4.0, rel=0.15)
    before = nll(pool(member_probabilities(members, 1.0)), labels)
    after = nll(pool(member_probabilities(members, t)), labels)
    assert after < before - 0.1


def test_temperature_of_a_calibrated_model_stays_near_one():
    members, labels = _overconfident(sharpen=1.0)
    assert fit_temperature(members, labels) == pytest.approx(1.0, abs=0.1)


def test_variance_scale_corrects_overconfident_gaussians():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5000, generator=g) * 2.0  # true variance 4
    # Raw scale s gives variance softplus(s) + 1e-6 = 1: four times too small.
    raw = torch.full((2, 5000), math.log(math.e - 1))
    outputs = torch.stack([torch.zeros(2, 5000), raw], dim=-1)
    scale = fit_variance_scale(outputs, y)
    assert scale == pytest.approx(4.0, rel=0.1)
    means, variances = torch.zeros(2, 5000), torch.ones(2, 5000)
    assert gaussian_mixture_nll(means, variances * scale, y) < gaussian_mixture_nll(
        means, variances, y
    )


@pytest.mark.parametrize("method", list(ConformalMethod))
def test_conformal_calibration_reaches_its_coverage_on_fresh_data(method):
    members, labels = _overconfident(n=6000)
    probs = pool(member_probabilities(members, 4.0))
    spec = calibrate_conformal(probs[:3000], labels[:3000], method, coverage=0.9)
    assert spec.method is method and spec.num_calibration == 3000
    sets = prediction_sets(probs[3000:], spec.score_threshold, method)
    covered = sets[torch.arange(3000), labels[3000:]].double().mean().item()
    assert covered == pytest.approx(0.9, abs=0.02)


def test_conformal_threshold_is_none_when_the_split_is_too_small():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    spec = calibrate_conformal(probs, torch.tensor([0, 1]), "lac", coverage=0.9)
    assert spec.threshold is None and spec.score_threshold == math.inf


def test_abstention_keeps_the_selective_error_below_target():
    members, labels = _overconfident(n=6000)
    probs = pool(member_probabilities(members, 4.0))
    spec = calibrate_abstention(probs, labels, target_error=0.1)
    confidence, predicted = probs.max(-1)
    kept = confidence >= spec.threshold
    assert 0 < spec.calibration_coverage < 1
    assert spec.calibration_coverage == pytest.approx(kept.double().mean().item())
    assert (predicted[kept] != labels[kept]).double().mean().item() <= 0.1


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+(?:e[-+]?\d+)?", text)]


def _separable(n: int, flipped: float, seed: int):
    """Member logits whose top class is the label, but for a ``flipped`` fraction."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    logits = torch.randn(3, n, 4, generator=g)
    logits[:, torch.arange(n), labels] += 5.0
    wrong = torch.rand(n, generator=g) < flipped
    labels[wrong] = (labels[wrong] + 1) % 4
    return logits, labels


def test_a_temperature_from_a_separable_split_is_rejected_on_the_check_split():
    fit_logits, fit_labels = _separable(300, 0.0, seed=0)
    check_logits, check_labels = _separable(300, 0.1, seed=1)
    collapsed = fit_temperature(fit_logits, fit_labels)
    assert collapsed < 0.5  # the NLL of a separable split keeps falling as T → 0
    t, warning = checked_temperature(fit_logits, fit_labels, check_logits, check_labels)
    assert t == 1.0 and "rejected" in warning and "\n" not in warning
    raw = nll(pool(member_probabilities(check_logits, 1.0)), check_labels)
    worse = nll(pool(member_probabilities(check_logits, collapsed)), check_labels)
    rejected, *nlls = _numbers(warning)
    assert rejected == pytest.approx(collapsed, rel=1e-3)
    assert nlls == pytest.approx([raw, worse], abs=1e-3) and worse > raw


def _halves(members, labels):
    return members[:, :2000], labels[:2000], members[:, 2000:], labels[2000:]


def test_a_temperature_that_helps_the_check_split_is_kept_silently():
    members, labels = _overconfident()
    t, warning = checked_temperature(*_halves(members, labels))
    assert warning is None and t == pytest.approx(fit_temperature(members[:, :2000], labels[:2000]))
    assert t == pytest.approx(4.0, rel=0.15)


def test_an_implausible_temperature_that_helps_is_kept_with_a_warning():
    members, labels = _overconfident(sharpen=40.0)
    t, warning = checked_temperature(*_halves(members, labels))
    assert t > 10 and "kept" in warning and "plausible" in warning


def _gaussians(n: int, noise: float, seed: int):
    """Members predicting mean 0 and variance 1 for targets of standard deviation ``noise``."""
    y = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * noise
    raw = torch.full((2, n), math.log(math.e - 1))  # softplus(raw) + 1e-6 = 1
    return torch.stack([torch.zeros(2, n), raw], dim=-1), y


def test_variance_scale_is_checked_the_same_way():
    outputs, y = _gaussians(2000, 2.0, seed=0)
    check, check_y = _gaussians(2000, 2.0, seed=1)
    scale, warning = checked_variance_scale(outputs, y, check, check_y)
    assert warning is None and scale == pytest.approx(4.0, rel=0.1)
    tight, tight_y = _gaussians(2000, 0.01, seed=0)  # the fit split wants s ≈ 1e-4
    scale, warning = checked_variance_scale(tight, tight_y, check, check_y)
    assert scale == 1.0 and "variance scale" in warning and "rejected" in warning
