"""Tests for serving.predictive: pooling, uncertainty decomposition, classify and regress."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from serving.conformal import prediction_sets
from serving.manifest import ConformalMethod
from serving.predictive import (
    MIN_VARIANCE,
    classify,
    disagreement,
    entropy,
    expected_entropy,
    gaussian_parameters,
    member_probabilities,
    mutual_information,
    pool,
    regress,
    split_batch,
)


def test_opposite_certain_members_by_hand():
    members = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [S=2, B=1, C=2]
    assert torch.allclose(pool(members), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(entropy(pool(members)), torch.tensor([math.log(2)]))
    assert torch.equal(expected_entropy(members), torch.tensor([0.0]))
    assert torch.allclose(mutual_information(members), torch.tensor([math.log(2)]))
    # the pool ties, so its top class is 0; the second member disagrees
    assert torch.equal(disagreement(members), torch.tensor([0.5]))


def test_mixed_members_by_hand():
    members = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]], dtype=torch.float64)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    total, expected = h(0.7), (h(0.9) + h(0.5)) / 2
    assert entropy(pool(members)).item() == pytest.approx(total)
    assert expected_entropy(members).item() == pytest.approx(expected)
    assert mutual_information(members).item() == pytest.approx(total - expected)


def test_identical_members_have_no_epistemic_uncertainty():
    probs = torch.softmax(torch.randn(1, 6, 4), dim=-1).expand(5, 6, 4)
    assert torch.allclose(mutual_information(probs), torch.zeros(6), atol=1e-6)
    assert (mutual_information(probs) >= 0).all()
    assert torch.equal(disagreement(probs), torch.zeros(6))


def test_entropy_of_exact_zeros_and_ones_is_finite():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    assert torch.allclose(entropy(probs), torch.tensor([0.0, math.log(2)]))
    saturated = torch.softmax(torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]]), dim=-1)
    for value in (expected_entropy(saturated), mutual_information(saturated)):
        assert torch.isfinite(value).all()


def test_entropy_decomposition_identity():
    member_probs = member_probabilities(torch.randn(7, 20, 5, dtype=torch.float64) * 3, 0.7)
    total = entropy(pool(member_probs))
    assert torch.allclose(total, expected_entropy(member_probs) + mutual_information(member_probs))
    assert (mutual_information(member_probs) > 0).all()


def test_temperature_divides_logits_and_flattens():
    logits = torch.randn(3, 4, 10) * 5
    assert torch.allclose(member_probabilities(logits, 2.0), torch.softmax(logits / 2, dim=-1))
    hot, warm = entropy(member_probabilities(logits, 1.0)), entropy(member_probabilities(logits, 4))
    assert (warm > hot).all()
    flat = member_probabilities(logits, 1e6)
    assert torch.allclose(flat, torch.full_like(flat, 0.1), atol=1e-4)


def test_disagreement_counts_members_off_the_pooled_top_class():
    members = torch.tensor(
        [[[0.6, 0.4]], [[0.7, 0.3]], [[0.2, 0.8]], [[0.55, 0.45]]]
    )  # pool [0.5125, 0.4875]: top class 0, one member of four votes 1
    assert torch.equal(disagreement(members), torch.tensor([0.25]))


def test_classify_fields_and_shapes():
    s, b, c = 6, 5, 3
    logits = torch.randn(s, b, c)
    out = classify(logits, temperature=1.5, return_members=True)
    member_probs = torch.softmax(logits / 1.5, dim=-1)
    assert torch.allclose(out.member_probs, member_probs)
    assert torch.allclose(out.probs, member_probs.mean(0))
    assert torch.equal(out.labels, out.probs.argmax(-1))
    assert torch.equal(out.confidence, out.probs.max(-1).values)
    for field in ("entropy", "expected_entropy", "mutual_information", "disagreement"):
        assert getattr(out, field).shape == (b,), field
    assert torch.allclose(out.entropy, out.expected_entropy + out.mutual_information, atol=1e-6)
    assert out.prediction_sets is None and out.abstain is None
    assert classify(logits).member_probs is None


@pytest.mark.parametrize("method", list(ConformalMethod))
def test_classify_wires_prediction_sets_and_abstention(method):
    logits = torch.randn(4, 8, 5) * 2
    out = classify(
        logits, conformal_method=method.value, conformal_threshold=0.8, abstain_below=0.5
    )
    assert out.prediction_sets.dtype == torch.bool and out.prediction_sets.shape == (8, 5)
    assert torch.equal(out.prediction_sets, prediction_sets(out.probs, 0.8, method))
    assert torch.equal(out.abstain, out.confidence < 0.5)
    at_threshold = classify(logits, abstain_below=out.confidence[0].item()).abstain
    assert not at_threshold[0]  # confidence equal to the threshold answers
    assert classify(logits, abstain_below=math.inf).abstain.all()
    assert not classify(logits, abstain_below=0.0).abstain.any()


def test_regress_mixture_moments_against_numpy():
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(4, 3, 2))
    mu = outputs[..., 0]
    var = 2.5 * (np.log1p(np.exp(outputs[..., 1])) + MIN_VARIANCE)
    mean = mu.mean(0)
    aleatoric = var.mean(0)
    epistemic = (mu**2).mean(0) - mean**2
    out = regress(torch.from_numpy(outputs), variance_scale=2.5, return_members=True)
    np.testing.assert_allclose(out.mean.numpy(), mean)
    np.testing.assert_allclose(out.aleatoric.numpy(), aleatoric)
    np.testing.assert_allclose(out.epistemic.numpy(), epistemic, atol=1e-12)
    np.testing.assert_allclose(out.variance.numpy(), aleatoric + epistemic, atol=1e-12)
    np.testing.assert_allclose(out.member_means.numpy(), mu)
    np.testing.assert_allclose(out.member_variances.numpy(), var)
    assert regress(torch.from_numpy(outputs)).member_means is None


def test_regress_single_member_and_large_offsets():
    one = regress(torch.tensor([[[3.0, 0.0]]]))
    assert one.epistemic.item() == 0.0
    assert one.variance.item() == pytest.approx(math.log(2) + MIN_VARIANCE)
    # E[μ²] − E[μ]² would cancel catastrophically at this offset in float32
    offset = torch.tensor([[[1e4 + 0.5, 0.0]], [[1e4 - 0.5, 0.0]]])
    assert regress(offset).epistemic.item() == pytest.approx(0.25)


def test_gaussian_parameters_keeps_variance_positive():
    mean, var = gaussian_parameters(torch.tensor([[1.0, -200.0], [2.0, 3.0]]))
    assert torch.equal(mean, torch.tensor([1.0, 2.0]))
    assert var[0].item() == pytest.approx(MIN_VARIANCE)
    assert var[1].item() == pytest.approx(math.log1p(math.exp(3.0)) + MIN_VARIANCE)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: member_probabilities(torch.randn(2, 3), 1.0), ValueError, "3 dimension"),
        (lambda: member_probabilities(torch.randn(2, 3, 4), 0.0), ValueError, "temperature"),
        (lambda: member_probabilities(torch.randn(2, 3, 4), math.nan), ValueError, "temperature"),
        (lambda: member_probabilities(torch.ones(2, 3, 4, dtype=torch.long)), TypeError, "float"),
        (lambda: pool([[0.5, 0.5]]), TypeError, "torch.Tensor"),
        (lambda: entropy(torch.zeros(3, 0)), ValueError, "non-empty"),
        (
            lambda: classify(torch.randn(2, 3, 4), conformal_method="lac"),
            ValueError,
            "given together",
        ),
        (
            lambda: classify(torch.randn(2, 3, 4), conformal_method="raps", conformal_threshold=1),
            ValueError,
            "'aps', 'lac'",
        ),
        (lambda: classify(torch.randn(2, 3, 4), abstain_below=math.nan), ValueError, "nan"),
        (lambda: regress(torch.randn(2, 3, 3)), ValueError, r"\[\.\.\., 2\]"),
        (lambda: regress(torch.randn(2, 3, 2), variance_scale=-1.0), ValueError, "variance_scale"),
    ],
)
def test_argument_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("predict", "outputs"),
    [
        (
            lambda x, members: classify(
                x,
                temperature=1.5,
                conformal_method="aps",
                conformal_threshold=0.8,
                abstain_below=0.5,
                return_members=members,
            ),
            torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(0)),
        ),
        (
            lambda x, members: regress(x, variance_scale=2.0, return_members=members),
            torch.randn(5, 6, 2, generator=torch.Generator().manual_seed(1)),
        ),
    ],
)
def test_a_split_batch_equals_each_part_predicted_alone(predict, outputs):
    sizes, keep = [1, 3, 2], [True, False, True]
    parts = split_batch(predict(outputs, True), sizes, keep)
    for part, chunk, members in zip(parts, outputs.split(sizes, dim=1), keep, strict=True):
        alone = predict(chunk, members)
        for field in dataclasses.fields(alone):
            ours, theirs = getattr(part, field.name), getattr(alone, field.name)
            assert (ours is None) == (theirs is None), field.name
            if theirs is not None:
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="one keep_members flag per part"):
        split_batch(predict(outputs, False), sizes, [True])
