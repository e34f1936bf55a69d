"""Tests for serving.predictor: the pooled prediction against a hand computation, and refusals."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from serving.bundle import Bundle, load_bundle
from serving.errors import InputError
from serving.manifest import (
    AbstentionSpec,
    ArchitectureSpec,
    ConformalSpec,
    InputSpec,
    buffer_key,
    draw_buffer_key,
    vertex_key,
)
from serving.predictor import Predictor

if TYPE_CHECKING:
    from helpers import TinyBundle

MakeBundle = Callable[..., "TinyBundle"]


def _load(tiny: TinyBundle, path: Path) -> Bundle:
    return load_bundle(tiny.write(path))


def _predictor(tiny: TinyBundle, path: Path) -> Predictor:
    return Predictor(_load(tiny, path), allow_custom_architecture=tiny.custom)


def _inputs(batch: int = 6, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed))


def _hand_member_states(
    tiny: TinyBundle, draws: int | None = None, *, own_batchnorm: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Every member's full state dict, mixed in float64 from the raw tensors."""
    manifest, tensors = tiny.manifest, tiny.tensors
    states = []
    for m, simplex in enumerate(manifest.simplexes):
        for s, draw in enumerate(simplex.draws[:draws]):
            alpha = torch.tensor(draw.alpha, dtype=torch.float64)
            state = {}
            for name in manifest.parameter_names:
                stacked = torch.stack(
                    [tensors[vertex_key(m, j, name)] for j in range(simplex.num_vertices)]
                ).double()
                state[name] = torch.tensordot(alpha, stacked, dims=1)
            state |= {name: tensors[buffer_key(m, name)] for name in manifest.buffer_names}
            if own_batchnorm and draw.batchnorm:
                for name in manifest.batchnorm_buffer_names:
                    state[name] = tensors[draw_buffer_key(m, s, name)]
            states.append(state)
    return states


def _hand_member_probs(
    tiny: TinyBundle, x: torch.Tensor, draws: int | None = None, *, own_batchnorm: bool = True
) -> torch.Tensor:
    """Member probabilities ``[S, B, C]``: load_state_dict, eval mode, softmax(logits / T)."""
    manifest = tiny.manifest
    mean = torch.tensor(manifest.input.mean, dtype=torch.float64)
    std = torch.tensor(manifest.input.std, dtype=torch.float64)
    z = (x.double() - mean) / std
    probs = []
    for state in _hand_member_states(tiny, draws, own_batchnorm=own_batchnorm):
        model = tiny.build_model().double()
        model.load_state_dict(state)  # strict: every parameter and buffer is given
        model.eval()
        with torch.no_grad():
            probs.append(torch.softmax(model(z) / manifest.temperature, dim=-1))
    return torch.stack(probs).float()


# --- the prediction -------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
def test_prediction_equals_hand_computation(
    tmp_path: Path, make_tiny_bundle: MakeBundle, batchnorm: bool
) -> None:
    tiny = make_tiny_bundle(batchnorm=batchnorm)
    x = _inputs()
    prediction = _predictor(tiny, tmp_path / "b").predict(x, return_members=True)
    members = _hand_member_probs(tiny, x)

    assert prediction.member_probs is not None
    assert prediction.member_probs.shape == (4, 6, 3)  # 2 simplexes x 2 draws, [S, B, C]
    torch.testing.assert_close(prediction.member_probs, members, atol=1e-6, rtol=0)
    torch.testing.assert_close(prediction.probs, members.mean(dim=0), atol=1e-6, rtol=0)
    confidence, labels = members.mean(dim=0).max(dim=-1)
    assert torch.equal(prediction.labels, labels)
    torch.testing.assert_close(prediction.confidence, confidence, atol=1e-6, rtol=0)


def test_warm_up_prepares_the_default_members_before_the_first_request(
    tmp_path: Path, make_tiny_bundle: MakeBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.engine.fused import FusedEngine

    tiny = make_tiny_bundle()
    predictor = Predictor(_load(tiny, tmp_path / "b"), engine="fused")
    stacked: list[tuple[int, ...]] = []
    stack = FusedEngine.stack

    def counting(self: FusedEngine, members: tuple[int, ...]) -> dict[str, torch.Tensor]:
        stacked.append(tuple(members))
        return stack(self, members)

    monkeypatch.setattr(FusedEngine, "stack", counting)
    predictor.warm_up()
    assert stacked == [tuple(predictor.member_indices())]
    predictor.predict(_inputs())
    assert len(stacked) == 1  # the first request found the members stacked


def test_members_are_not_returned_unless_asked(tiny_bundle_dir: Path) -> None:
    assert Predictor.from_path(tiny_bundle_dir).predict(_inputs()).member_probs is None


def test_temperature_divides_the_logits(tmp_path: Path, make_tiny_bundle: MakeBundle) -> None:
    x = _inputs()
    cold = _predictor(make_tiny_bundle(temperature=1.0), tmp_path / "cold")
    hot = _predictor(make_tiny_bundle(temperature=3.0), tmp_path / "hot")
    cold_members = cold.predict(x, return_members=True).member_probs
    hot_members = hot.predict(x, return_members=True).member_probs
    assert cold_members is not None and hot_members is not None
    # softmax(l / 3) is softmax(l) ** (1 / 3), renormalised.
    expected = cold_members.double() ** (1 / 3)
    expected = (expected / expected.sum(dim=-1, keepdim=True)).float()
    torch.testing.assert_close(hot_members, expected, atol=1e-6, rtol=0)


def test_one_draw_uses_only_the_first_draw_of_each_simplex(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    tiny = make_tiny_bundle(draws=3)
    predictor = _predictor(tiny, tmp_path / "b")
    x = _inputs()
    one = predictor.predict(x, draws=1, return_members=True)
    assert predictor.member_indices(1) == [0, 3]
    assert one.member_probs is not None and one.member_probs.shape == (2, 6, 3)
    expected = _hand_member_probs(tiny, x, draws=1)
    torch.testing.assert_close(one.member_probs, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(one.probs, expected.mean(dim=0), atol=1e-6, rtol=0)
    two = predictor.predict(x, draws=2)
    torch.testing.assert_close(
        two.probs, _hand_member_probs(tiny, x, draws=2).mean(dim=0), atol=1e-6, rtol=0
    )
    assert not torch.allclose(one.probs, two.probs, atol=1e-4)


def test_max_draws_is_the_smallest_simplex_draw_count(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    tiny = make_tiny_bundle(draws=3)
    simplexes = list(tiny.manifest.simplexes)
    simplexes[1] = simplexes[1].model_copy(update={"draws": simplexes[1].draws[:2]})
    manifest = tiny.manifest.model_copy(update={"simplexes": tuple(simplexes)})
    tensors = {k: v for k, v in tiny.tensors.items() if k in manifest.tensor_keys()}
    smaller = dataclasses.replace(tiny, manifest=manifest, tensors=tensors)
    predictor = _predictor(smaller, tmp_path / "b")
    assert predictor.max_draws == 2
    assert predictor.member_indices() == [0, 1, 2, 3, 4]
    assert predictor.member_indices(2) == [0, 1, 3, 4]
    with pytest.raises(InputError, match="between 1 and 2, got 3"):
        predictor.predict(_inputs(), draws=3)


@pytest.mark.parametrize("draws", [0, -1, 3])
def test_draws_out_of_range_are_refused(tiny_bundle_dir: Path, draws: int) -> None:
    with pytest.raises(InputError, match=f"draws must be between 1 and 2, got {draws}"):
        Predictor.from_path(tiny_bundle_dir).predict(_inputs(), draws=draws)


# --- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [torch.zeros(2, 5), torch.zeros(4), torch.zeros(2, 4, 1), torch.zeros(2, 2, 2)],
    ids=["features", "no-batch", "extra-dim", "reshaped"],
)
def test_wrong_input_shape_is_refused(tiny_bundle_dir: Path, x: torch.Tensor) -> None:
    predictor = Predictor.from_path(tiny_bundle_dir)
    with pytest.raises(
        InputError, match=re.escape(f"expected inputs of shape [batch, 4], got {list(x.shape)}")
    ):
        predictor.predict(x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_refused(tiny_bundle_dir: Path, bad: float) -> None:
    x = _inputs()
    x[3, 1] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        Predictor.from_path(tiny_bundle_dir).predict(x)


def test_empty_batch_is_refused(tiny_bundle_dir: Path) -> None:
    with pytest.raises(InputError, match="empty"):
        Predictor.from_path(tiny_bundle_dir).predict(torch.zeros(0, 4))


def test_non_numeric_inputs_are_refused(tiny_bundle_dir: Path) -> None:
    with pytest.raises(InputError, match="expected numeric inputs"):
        Predictor.from_path(tiny_bundle_dir).predict(torch.zeros(2, 4, dtype=torch.bool))


def test_integer_and_double_inputs_match_float32(tiny_bundle_dir: Path) -> None:
    predictor = Predictor.from_path(tiny_bundle_dir)
    x = torch.randint(-3, 4, (5, 4))
    expected = predictor.predict(x.float()).probs
    assert torch.equal(predictor.predict(x).probs, expected)
    assert torch.equal(predictor.predict(x.double()).probs, expected)


def test_input_normalisation_is_applied(tmp_path: Path, make_tiny_bundle: MakeBundle) -> None:
    base = make_tiny_bundle()
    spec = base.manifest.input
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0])
    shifted_spec = InputSpec(
        shape=spec.shape, mean=tuple((torch.tensor(spec.mean) + shift).tolist()), std=spec.std
    )
    scaled_spec = InputSpec(shape=spec.shape, mean=(0.0,) * 4, std=tuple(2 * s for s in spec.std))
    unit_spec = InputSpec(shape=spec.shape, mean=(0.0,) * 4, std=spec.std)
    predictors = {
        name: _predictor(make_tiny_bundle(input=s), tmp_path / name)
        for name, s in [("shifted", shifted_spec), ("scaled", scaled_spec), ("unit", unit_spec)]
    }
    original = _predictor(base, tmp_path / "base")
    x = _inputs()
    probs = original.predict(x).probs

    # (x + δ - (μ + δ)) / σ = (x - μ) / σ: shifting inputs and mean together changes nothing.
    torch.testing.assert_close(predictors["shifted"].predict(x + shift).probs, probs)
    assert not torch.allclose(predictors["shifted"].predict(x).probs, probs, atol=1e-3)
    # (2x) / (2σ) = x / σ.
    torch.testing.assert_close(
        predictors["scaled"].predict(2 * x).probs, predictors["unit"].predict(x).probs
    )
    # And against the formula: a zero-mean bundle sees x - μ exactly as the original sees x.
    mean = torch.tensor(spec.mean)
    torch.testing.assert_close(predictors["unit"].predict(x - mean).probs, probs)


# --- BatchNorm ------------------------------------------------------------------------------


def test_batchnorm_draws_use_their_own_statistics(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    tiny = make_tiny_bundle(batchnorm=True)
    x = _inputs()
    members = _predictor(tiny, tmp_path / "b").predict(x, return_members=True).member_probs
    assert members is not None
    own = _hand_member_probs(tiny, x)
    shared = _hand_member_probs(tiny, x, own_batchnorm=False)
    torch.testing.assert_close(members, own, atol=1e-6, rtol=0)
    for k in range(len(members)):
        assert not torch.allclose(members[k], shared[k], atol=1e-3), f"member {k}"

    # Same mixed weights, the other draw's statistics: a different member.
    states = _hand_member_states(tiny)
    model = tiny.build_model().double().eval()
    swapped = dict(states[0])
    swapped |= {n: states[1][n] for n in tiny.manifest.batchnorm_buffer_names}
    model.load_state_dict(swapped)
    with torch.no_grad():
        z = tiny.manifest.input.normalise(x).double()
        other = torch.softmax(model(z) / tiny.manifest.temperature, dim=-1).float()
    assert not torch.allclose(members[0], other, atol=1e-3)


def test_batchnorm_prediction_does_not_depend_on_the_batch(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    predictor = _predictor(make_tiny_bundle(batchnorm=True), tmp_path / "b")
    x = _inputs()
    full = predictor.predict(x).probs
    single = torch.cat([predictor.predict(x[i : i + 1]).probs for i in range(len(x))])
    torch.testing.assert_close(single, full)


# --- prediction sets and abstention -----------------------------------------------------------


def _between(values: torch.Tensor) -> float:
    """The midpoint of the two middle values."""
    ordered = values.double().sort().values
    k = len(ordered) // 2
    return float(ordered[k - 1] + ordered[k]) / 2


def _aps_sets(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """APS by hand: a class is in the set iff the mass of the classes ranked above it <= t."""
    sets = torch.zeros_like(probs, dtype=torch.bool)
    for i, row in enumerate(probs.tolist()):
        above = 0.0
        for c in sorted(range(len(row)), key=lambda c: (-row[c], c)):
            sets[i, c] = above <= threshold
            above += row[c]
    return sets


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_prediction_sets_and_abstention_follow_the_manifest(
    tmp_path: Path, make_tiny_bundle: MakeBundle, method: str
) -> None:
    tiny = make_tiny_bundle()
    x = _inputs(batch=40)
    probs = _predictor(tiny, tmp_path / "probe").predict(x).probs
    confidence = probs.max(dim=-1).values
    # Thresholds inside the data, so that both outcomes occur, and between two data points,
    # so that rounding cannot decide a comparison.
    abstain_at = _between(confidence)
    if method == "lac":
        set_threshold = _between(1 - probs.flatten())
    else:
        set_threshold = _between(probs.sort(dim=-1, descending=True).values[:, :2].sum(-1))
    conformal = ConformalSpec(
        method=method, coverage=0.9, threshold=set_threshold, num_calibration=9
    )
    abstention = tiny.manifest.abstention
    assert abstention is not None
    manifest = tiny.manifest.model_copy(
        update={
            "conformal": conformal,
            "abstention": abstention.model_copy(update={"threshold": abstain_at}),
        }
    )
    bundle = _load(dataclasses.replace(tiny, manifest=manifest), tmp_path / "b")
    assert bundle.manifest.conformal == conformal
    prediction = Predictor(bundle).predict(x)

    assert prediction.abstain is not None and prediction.prediction_sets is not None
    assert torch.equal(prediction.abstain, prediction.confidence < abstain_at)
    assert 0 < prediction.abstain.sum() < len(x)
    if method == "lac":
        expected_sets = (1 - prediction.probs) <= set_threshold
    else:
        expected_sets = _aps_sets(prediction.probs, set_threshold)
    assert torch.equal(prediction.prediction_sets, expected_sets)
    sizes = prediction.prediction_sets.sum(dim=-1)
    assert sizes.min() < sizes.max()


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_no_conformal_threshold_puts_every_class_in_every_set(
    tmp_path: Path, make_tiny_bundle: MakeBundle, method: str
) -> None:
    conformal = ConformalSpec(method=method, coverage=0.9, threshold=None, num_calibration=3)
    predictor = _predictor(make_tiny_bundle(conformal=conformal), tmp_path / "b")
    sets = predictor.predict(_inputs()).prediction_sets
    assert sets is not None and sets.all()


def test_no_abstention_threshold_abstains_on_everything(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    abstention = AbstentionSpec(target_error=0.01, threshold=None, calibration_coverage=0.0)
    predictor = _predictor(make_tiny_bundle(abstention=abstention), tmp_path / "b")
    abstain = predictor.predict(_inputs()).abstain
    assert abstain is not None and abstain.all()


def test_without_conformal_or_abstention_there_are_no_sets_or_flags(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    predictor = _predictor(make_tiny_bundle(conformal=None, abstention=None), tmp_path / "b")
    prediction = predictor.predict(_inputs())
    assert prediction.prediction_sets is None
    assert prediction.abstain is None


# --- refused bundles ------------------------------------------------------------------------


def test_custom_architecture_needs_explicit_permission(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    tiny = make_tiny_bundle(batchnorm=True)
    path = tiny.write(tmp_path / "b")
    with pytest.raises(ValueError, match="must be allowed explicitly"):
        Predictor.from_path(path)
    with pytest.raises(ValueError, match="must be allowed explicitly"):
        Predictor(load_bundle(path))
    assert Predictor.from_path(path, allow_custom_architecture=True).num_members == 4


@pytest.mark.parametrize(
    "architecture",
    [
        ArchitectureSpec(name="mlp", kwargs={"hidden": [8, 8]}),  # extra layer: extra names
        ArchitectureSpec(name="cnn", kwargs={}),
    ],
    ids=["mlp-deeper", "cnn"],
)
def test_parameter_names_that_do_not_match_the_architecture_are_refused(
    tmp_path: Path, make_tiny_bundle: MakeBundle, architecture: ArchitectureSpec
) -> None:
    tiny = make_tiny_bundle()
    manifest = tiny.manifest.model_copy(update={"architecture": architecture})
    if architecture.name == "cnn":
        manifest = manifest.model_copy(
            update={"input": InputSpec(shape=(1, 4), mean=(0.0,), std=(1.0,))}
        )
    bundle = _load(dataclasses.replace(tiny, manifest=manifest), tmp_path / "b")
    with pytest.raises(ValueError, match="parameter or buffer names differ"):
        Predictor(bundle)


def test_renamed_parameters_are_refused(tmp_path: Path, make_tiny_bundle: MakeBundle) -> None:
    tiny = make_tiny_bundle()
    old, new = "1.weight", "first.weight"
    names = tuple(new if n == old else n for n in tiny.manifest.parameter_names)
    manifest = tiny.manifest.model_copy(update={"parameter_names": names})
    tensors = dict(tiny.tensors)
    for m, simplex in enumerate(manifest.simplexes):
        for j in range(simplex.num_vertices):
            tensors[vertex_key(m, j, new)] = tensors.pop(vertex_key(m, j, old))
    bundle = _load(dataclasses.replace(tiny, manifest=manifest, tensors=tensors), tmp_path / "b")
    with pytest.raises(ValueError, match="'mlp' does not match the bundle"):
        Predictor(bundle)


def test_missing_buffer_names_are_refused(tmp_path: Path, make_tiny_bundle: MakeBundle) -> None:
    tiny = make_tiny_bundle(batchnorm=True)
    kept = tuple(n for n in tiny.manifest.buffer_names if not n.endswith("num_batches_tracked"))
    manifest = tiny.manifest.model_copy(
        update={"buffer_names": kept, "batchnorm_buffer_names": kept}
    )
    tensors = {k: v for k, v in tiny.tensors.items() if k in manifest.tensor_keys()}
    bundle = _load(dataclasses.replace(tiny, manifest=manifest, tensors=tensors), tmp_path / "b")
    with pytest.raises(ValueError, match="parameter or buffer names differ"):
        Predictor(bundle, allow_custom_architecture=True)


def test_parameter_shapes_that_do_not_match_the_architecture_are_refused(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    tiny = make_tiny_bundle()
    # Same names, wider hidden layer: the tensors no longer fit.
    architecture = ArchitectureSpec(name="mlp", kwargs={"hidden": [16]})
    manifest = tiny.manifest.model_copy(update={"architecture": architecture})
    bundle = _load(dataclasses.replace(tiny, manifest=manifest), tmp_path / "b")
    with pytest.raises(ValueError, match=r"1\.weight.*\[8, 4\].*\[16, 4\]"):
        Predictor(bundle)


def test_fresh_draws_are_reproducible_prefixes(tmp_path, make_tiny_bundle):
    path = make_tiny_bundle(draws=2).write(tmp_path / "b")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    one, two = (Predictor(load_bundle(path), max_fresh_draws=2) for _ in range(2))
    assert one.stored_draws == 2 and one.max_draws == 4
    one.predict(x, draws=3)  # materialises one fresh draw per simplex first
    four = one.outputs(x, draws=4)
    assert four.shape[0] == 2 * 4  # 2 simplexes x (2 stored + 2 fresh)
    torch.testing.assert_close(four, two.outputs(x, draws=4))
    stored = one.outputs(x)
    torch.testing.assert_close(four[[0, 1, 4, 5]], stored)  # stored draws come first
    assert not torch.allclose(four[2], four[3])  # fresh draws differ from each other
    with pytest.raises(InputError, match="between 1 and 4"):
        one.member_indices(5)


def test_fresh_draws_need_a_model_without_batchnorm(tmp_path, make_tiny_bundle):
    bundle = load_bundle(make_tiny_bundle(batchnorm=True).write(tmp_path / "bn"))
    with pytest.raises(ValueError, match="BatchNorm"):
        Predictor(bundle, allow_custom_architecture=True, max_fresh_draws=1)
    predictor = Predictor(bundle, allow_custom_architecture=True)
    with pytest.raises(InputError, match=r"between 1 and 2, got 3$"):
        predictor.member_indices(3)


# --- what callers use instead of the engine -------------------------------------------------


def test_check_inputs_returns_float32_or_an_input_error(tiny_bundle_dir: Path) -> None:
    predictor = Predictor.from_path(tiny_bundle_dir)
    x = torch.randint(-3, 4, (5, 4))
    checked = predictor.check_inputs(x)
    assert checked.dtype == torch.float32 and torch.equal(checked, x.float())
    with pytest.raises(InputError, match=re.escape("shape [batch, 4], got [5, 3]")):
        predictor.check_inputs(torch.zeros(5, 3))


def test_member_outputs_follow_the_members_asked_for(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    predictor = _predictor(make_tiny_bundle(draws=3), tmp_path / "b")
    x = _inputs()
    every = predictor.outputs(x)
    assert every.shape == (6, 6, 3) and predictor.num_members == 6
    assert torch.equal(predictor.member_outputs(x, [4, 0, 2]), every[[4, 0, 2]])
    one = predictor.member_outputs(x, predictor.member_indices(1))
    assert torch.equal(one, predictor.outputs(x, 1)) and one.device.type == "cpu"


def test_added_members_run_only_when_asked_for(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    tiny = make_tiny_bundle()
    predictor = _predictor(tiny, tmp_path / "b")
    stored = predictor.member_indices()
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in _hand_member_states(tiny)[2].items()
    }
    added = predictor.add_members([state, state])
    assert added == [len(stored), len(stored) + 1] and predictor.num_members == len(stored) + 2
    assert predictor.member_indices() == stored  # requests never reach them
    outputs = predictor.member_outputs(_inputs(), [added[1], 2])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
