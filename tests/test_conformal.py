"""Tests for serving.conformal: scores, the split-conformal threshold, sets and abstention."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from serving.conformal import (
    ConformalMethod,
    abstention_threshold,
    conformal_threshold,
    conformity_scores,
    prediction_sets,
)

PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.2, 0.4]], dtype=torch.float64)
LABELS = torch.tensor([1, 1, 2])


def test_lac_scores_by_hand():
    scores = conformity_scores(PROBS, LABELS, "lac")
    assert torch.allclose(scores, torch.tensor([0.7, 0.4, 0.6], dtype=torch.float64))


def test_aps_scores_by_hand_with_ties_ranked_by_class_index():
    scores = conformity_scores(PROBS, LABELS, ConformalMethod.APS)
    # The mass ranked above the true class; row 3 ties classes 0 and 2 at 0.4: class 0 ranks
    # first, so class 2 has 0.4 above it.
    assert torch.allclose(scores, torch.tensor([0.5, 0.0, 0.4], dtype=torch.float64))
    tied_first = conformity_scores(PROBS[2:], torch.tensor([0]), "aps")
    assert torch.allclose(tied_first, torch.tensor([0.0], dtype=torch.float64))


@pytest.mark.parametrize("method", list(ConformalMethod))
def test_sets_agree_with_scores_of_every_class(method):
    probs = torch.softmax(torch.randn(50, 6), dim=-1)
    probs[:10, :3] = probs[:10, :3].mean(dim=-1, keepdim=True)  # exact ties
    all_scores = torch.stack(
        [conformity_scores(probs, torch.full((50,), c), method) for c in range(6)], dim=-1
    )
    for threshold in all_scores.flatten()[::7].tolist():
        assert torch.equal(prediction_sets(probs, threshold, method), all_scores <= threshold)


def test_aps_sets_add_tied_classes_in_index_order():
    sets = prediction_sets(PROBS[2:], 0.5, "aps")
    assert sets.tolist() == [[True, False, True]]
    # The top class has nothing above it: APS sets are never empty.
    assert prediction_sets(PROBS, 0.0, "aps").sum(dim=1).tolist() == [1, 1, 1]
    uniform = torch.full((2, 256), 1 / 256, dtype=torch.float64)  # large enough to defeat
    all_scores = torch.stack(  # an unstable sort's ordering of ties
        [conformity_scores(uniform, torch.full((2,), c), "aps") for c in range(256)], dim=-1
    )
    expected = torch.arange(0, 256, dtype=torch.float64).expand(2, 256) / 256
    assert torch.allclose(all_scores, expected)


def test_threshold_is_the_finite_sample_quantile():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    assert conformal_threshold(scores, 0.8) == pytest.approx(0.8)  # ceil(10 * 0.8) = 8th
    assert conformal_threshold(scores, 0.75) == pytest.approx(0.8)  # ceil(7.5) = 8th
    assert conformal_threshold(scores, 0.7) == pytest.approx(0.7)  # 7th
    assert conformal_threshold(scores, 0.05) == pytest.approx(0.1)  # ceil(0.5) = 1st


def test_threshold_rank_is_not_pushed_up_by_float_rounding():
    scores = torch.arange(1, 25, dtype=torch.float64)  # n = 24; 25 * 0.28 = 7 exactly
    assert 25 * 0.28 > 7  # the float product that a naive ceil would round up to 8
    assert conformal_threshold(scores, 0.28) == 7.0


def test_threshold_is_inf_when_coverage_cannot_be_met():
    scores = torch.rand(9)
    assert conformal_threshold(scores, 0.9) == scores.max().item()  # rank 9 of 9
    assert conformal_threshold(scores, 0.95) == math.inf  # rank 10 of 9
    assert prediction_sets(torch.rand(4, 3), math.inf, "aps").all()


@pytest.mark.parametrize("method", list(ConformalMethod))
@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_empirical_coverage_on_calibrated_data(method, coverage):
    generator = torch.Generator().manual_seed(0)
    n = 5000
    probs = torch.softmax(2 * torch.randn(2 * n, 10, generator=generator), dim=-1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # calibrated by design
    threshold = conformal_threshold(conformity_scores(probs[:n], labels[:n], method), coverage)
    sets = prediction_sets(probs[n:], threshold, method)
    covered = sets.gather(-1, labels[n:, None]).float().mean().item()
    assert abs(covered - coverage) < 0.02  # ~3.5 binomial standard errors at n = 5000


def test_aps_sets_are_nested_as_coverage_grows():
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(500, 8, generator=generator), dim=-1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    scores = conformity_scores(probs, labels, "aps")
    sets = [prediction_sets(probs, conformal_threshold(scores, c), "aps") for c in (0.5, 0.8, 0.95)]
    for smaller, larger in itertools.pairwise(sets):
        assert (larger | ~smaller).all()  # smaller ⊆ larger
        assert larger.sum() > smaller.sum()


def test_abstention_threshold_by_hand():
    confidence = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([True, True, False, True, False, False])
    # error rates keeping the top k: 0, 0, 1/3, 1/4, 2/5, 1/2
    assert abstention_threshold(confidence, correct, 0.25) == pytest.approx(0.7)
    assert abstention_threshold(confidence, correct, 0.3) == pytest.approx(0.7)
    assert abstention_threshold(confidence, correct, 0.2) == pytest.approx(0.9)
    assert abstention_threshold(confidence, correct, 0.5) == pytest.approx(0.5)
    shuffled = torch.tensor([5, 2, 0, 4, 1, 3])
    assert abstention_threshold(confidence[shuffled], correct[shuffled], 0.25) == pytest.approx(0.7)


def test_abstention_keeps_or_drops_ties_together():
    confidence = torch.tensor([0.9, 0.8, 0.8, 0.7])
    correct = torch.tensor([True, True, False, False])
    # keeping 0.9 and the first 0.8 would be error-free, but the tie cannot be split
    assert abstention_threshold(confidence, correct, 0.0) == pytest.approx(0.9)
    assert abstention_threshold(confidence, correct, 1 / 3) == pytest.approx(0.8)


def test_abstention_threshold_abstains_on_everything_when_unreachable():
    confidence = torch.tensor([0.9, 0.6])
    threshold = abstention_threshold(confidence, torch.tensor([False, True]), 0.1)
    assert threshold == math.inf and (confidence < threshold).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: conformity_scores(PROBS, LABELS, "raps"), ValueError, "'aps', 'lac'"),
        (lambda: conformity_scores(PROBS, LABELS[:2], "lac"), ValueError, r"shape \(3,\)"),
        (lambda: conformity_scores(PROBS, torch.tensor([0, 1, 3]), "lac"), ValueError, r"\[0, 2\]"),
        (lambda: conformity_scores(PROBS, LABELS.float(), "lac"), TypeError, "integer"),
        (lambda: conformal_threshold(torch.rand(5), 1.0), ValueError, r"\(0, 1\)"),
        (lambda: conformal_threshold(torch.rand(0), 0.9), ValueError, "non-empty"),
        (lambda: prediction_sets(PROBS[0], 0.5, "lac"), ValueError, "2 dimension"),
        (lambda: prediction_sets(PROBS, math.nan, "lac"), ValueError, "nan"),
        (lambda: abstention_threshold(torch.rand(3), torch.ones(3), 0.1), TypeError, "bool"),
        (
            lambda: abstention_threshold(torch.rand(3), torch.ones(2, dtype=torch.bool), 0.1),
            ValueError,
            "shape",
        ),
        (
            lambda: abstention_threshold(torch.rand(3), torch.ones(3, dtype=torch.bool), -0.1),
            ValueError,
            "target_error",
        ),
    ],
)
def test_argument_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()
