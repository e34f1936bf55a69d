"""A training budget: the plans that fit it, the choice on the validation split, and what the
bundle records of both."""

from __future__ import annotations

import argparse

import pytest

from helpers import tiny_config
from serving.bundle import load_bundle
from training.budget import budget_passes, plans
from training.cli import _budget
from training.cost import Cost
from training.errors import ConfigError
from training.pipeline import train


def test_every_order_gets_as_many_modes_as_its_vertices_leave_room_for():
    config = tiny_config(
        modes={"epochs": 10}, simplex={"vertices": 2, "epochs": 2, "samples": 5, "lambda": 0.1}
    )
    # A mode costs 10 × 100 passes, a vertex 2 × 5 × 100.
    assert [(p.modes, p.order, p.passes) for p in plans(config, 10_000, 100)] == [
        (10, 0, 10_000),
        (5, 1, 10_000),
        (3, 2, 9_000),
    ]


def test_the_lambda_search_is_paid_for_by_every_plan_with_a_simplex():
    config = tiny_config(
        modes={"epochs": 10},
        simplex={"vertices": 1, "epochs": 2, "samples": 5, "lambda": None},
    )
    # Five λ on one mode: four vertices of 1,000 passes beyond the chosen one's.
    [de, espro] = plans(config, 10_000, 100)
    assert (de.modes, espro.modes, espro.passes) == (10, 3, 4_000 + 3 * 2_000)


def test_longer_vertex_epochs_are_plans_of_their_own_and_pay_for_the_search_in_full():
    config = tiny_config(
        modes={"epochs": 10},
        simplex={"vertices": 1, "epochs": 2, "samples": 5, "lambda": None},
        budget={"mode_epochs": 100, "vertex_epochs": [4]},
    )
    # The search's five first vertices (2 epochs each) are reused only by 2-epoch vertices.
    shapes = [(p.modes, p.order, p.vertex_epochs, p.passes) for p in plans(config, 10_000, 100)]
    assert shapes == [(10, 0, 2, 10_000), (3, 1, 2, 4_000 + 3 * 2_000), (1, 1, 4, 5_000 + 3_000)]


def test_a_budget_too_small_for_one_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"budget: 999 passes do not train one mode of 1,000"):
        plans(tiny_config(modes={"epochs": 10}), 999, 100)


def test_a_budget_in_seconds_is_passes_at_the_first_modes_rate():
    config = tiny_config(budget={"seconds": 60})
    assert budget_passes(config, 100, passes_per_second=50.0) == 3_000
    assert budget_passes(tiny_config(budget={"mode_epochs": 2.5}), 100, 1.0) == 250


def test_the_command_line_reads_mode_epochs_or_a_time():
    assert _budget("300") == {"mode_epochs": 300.0}
    assert _budget("15m") == {"seconds": 900.0}
    assert _budget("2h") == {"seconds": 7200.0}
    with pytest.raises(argparse.ArgumentTypeError, match="neither mode-epochs"):
        _budget("ten")
    with pytest.raises(ConfigError, match="exactly one of mode_epochs and seconds"):
        tiny_config(budget={"mode_epochs": 1, "seconds": 1})


def test_train_ships_the_plan_that_scores_best_on_validation(tmp_path):
    config = tiny_config(budget={"mode_epochs": 12})
    path, _ = train(config, tmp_path / "bundle")
    manifest = load_bundle(path).manifest
    budget = manifest.training["budget"]
    tried = [(p["modes"], p["order"]) for p in budget["plans"]]
    assert tried == [(4, 0), (1, 1)]  # a mode is 3 mode-epochs, a vertex 2 × S = 2 more
    scores = [p["val_nll"] for p in budget["plans"]]
    chosen = budget["plans"][budget["chosen"]]
    assert chosen["val_nll"] == min(scores)
    assert len(manifest.simplexes) == chosen["modes"]
    assert {s.num_vertices for s in manifest.simplexes} == {chosen["order"] + 1}
    cost = {phase: Cost.from_dict(c) for phase, c in manifest.training["cost"].items()}
    # What the shipped ensemble trained fits the budget; the choice is reported beside it.
    assert cost["modes"].passes + cost["vertices"].passes <= budget["passes"]
    assert cost["selection"].forward > 0
    assert manifest.training["config"]["budget"]["mode_epochs"] == 12.0


def test_lambda_is_searched_once_on_first_vertices_and_then_fixed(tmp_path):
    config = tiny_config(
        budget={"mode_epochs": 12},
        simplex={"lambda": None, "search": {"grid": [0.03, 0.1]}},
    )
    path, _ = train(config, tmp_path / "bundle")
    training = load_bundle(path).manifest.training
    search = training["lambda_search"]
    assert search["grid"] == [0.03, 0.1] and training["lambda"] == search["best"]
    assert "lambda_search" in training["cost"]
    # The search's other vertex is paid for: 4 of the 12 mode-epochs leave one 1-simplex.
    assert [(p["modes"], p["order"]) for p in training["budget"]["plans"]] == [(4, 0), (1, 1)]
