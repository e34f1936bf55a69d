"""The λ search: an interior choice on a toy problem, its recorded cost, no broken simplexes,
and reuse of its work."""

from __future__ import annotations

import pytest

from helpers import tiny_config
from serving.bundle import load_bundle
from training.cost import Cost
from training.pipeline import train
from training.search import _choose
from training.spro import SimplexTrainer

GRID = [1e-4, 0.01, 0.03, 0.1, 10.0]


def spiral_config(seed: int, **overrides: dict):
    """Two noisy spirals and a wide MLP: draws near the mode add little, far ones break."""
    sections = {
        "data": {"name": "two_spirals", "options": {"n_samples": 600, "noise": 0.5}},
        "model": {"architecture": "mlp", "kwargs": {"hidden": [64, 64]}},
        "modes": {"count": 1, "epochs": 30},
        "simplex": {"lambda": None, "vertices": 1, "epochs": 5, "search": {"grid": GRID}},
        "draws": {"per_simplex": 5},
    }
    for key, value in overrides.items():
        sections[key] = {**sections[key], **value}
    return tiny_config(seed=seed, **sections)


@pytest.mark.parametrize("seed", [0, 3])
def test_the_search_picks_a_lambda_strictly_inside_its_grid(tmp_path, seed):
    path, _ = train(spiral_config(seed), tmp_path / "bundle")
    training = load_bundle(path).manifest.training
    search = training["lambda_search"]
    scores = search["scores"]
    assert search["grid"] == GRID and len(scores) == len(GRID)
    assert GRID[0] < search["best"] < GRID[-1]
    best = GRID.index(search["best"])
    assert scores[best] < scores[0] and scores[best] < scores[-1]
    assert scores[best] == min(scores)
    assert training["lambda"] == search["best"]
    assert not search["broken"][best]
    assert search["warnings"] == []
    # The vertices of the four other λ: 5 epochs of S = 2 samples over every training example.
    n_train = training["vertices"][0][0]["passes"] // 30
    cost = Cost.from_dict(search["cost"])
    assert cost.passes == (len(GRID) - 1) * 5 * 2 * n_train
    assert cost.forward > 0 and cost.seconds > 0


def test_a_best_lambda_at_the_end_of_the_grid_is_flagged(tmp_path):
    # With two values the best is always an end of the grid.
    config = spiral_config(0, simplex={"search": {"grid": [0.01, 0.03]}})
    path, _ = train(config, tmp_path / "bundle")
    search = load_bundle(path).manifest.training["lambda_search"]
    side = "smallest" if search["best"] == 0.01 else "largest"
    assert any(f"the {side} of the grid" in w for w in search["warnings"])


def test_a_lambda_that_breaks_a_simplex_is_passed_over_unless_all_do():
    grid = [0.01, 0.1, 1.0]
    assert _choose(grid, [0.5, 0.4, 0.3], [False, False, True]) == (0.1, [])
    best, warnings = _choose(grid, [0.5, 0.4, 0.3], [True, True, True])
    assert best == 1.0 and "every λ of the grid broke a simplex" in warnings[0]
    best, warnings = _choose(grid, [0.5, 0.4, 0.3], [True, False, False])
    assert best == 1.0 and "largest of the grid" in warnings[0]


def test_the_search_reuses_its_simplexes_and_a_fixed_lambda_skips_it(tmp_path, monkeypatch):
    calls = {"fit_mode": 0, "add_vertex": 0}
    for name in calls:
        real = getattr(SimplexTrainer, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(SimplexTrainer, name, counting)
    config = spiral_config(0, modes={"count": 2, "epochs": 5})
    train(config, tmp_path / "searched")
    # Each mode once; the search's vertices for 5 λ at mode 0, then only mode 1's vertex.
    assert calls == {"fit_mode": 2, "add_vertex": len(GRID) + 1}

    calls.update(fit_mode=0, add_vertex=0)
    fixed = spiral_config(0, modes={"count": 2, "epochs": 5}, simplex={"lambda": 0.03})
    path, _ = train(fixed, tmp_path / "fixed")
    assert calls == {"fit_mode": 2, "add_vertex": 2}
    training = load_bundle(path).manifest.training
    assert "lambda_search" not in training and training["lambda"] == 0.03
