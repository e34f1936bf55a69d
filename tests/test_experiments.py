"""``espro experiment NAME --quick``: every experiment writes its report, figures and sane
numbers. The quick sizes are smoke tests of the code paths, not evidence."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from serving.cli import main
from serving.engine.reference import ReferenceEngine
from serving.simplex import mix_vertices
from training.espro import TrainedSimplex, draw_members, member_states
from training.experiments.common import (
    Setup,
    draw,
    make_config,
    member_outputs,
    mode_states,
    setup,
)
from training.experiments.registry import EXPERIMENTS, run_experiment

pytestmark = pytest.mark.slow


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [float(value)]
    return []


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("experiments")
    done = {}
    for name in EXPERIMENTS:
        report, results, _ = run_experiment(name, quick=True, output=root / name)
        done[name] = (report, json.loads(results.read_text()))
    return done


class _BatchNormSetup(Setup):
    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def bn_setup() -> tuple[Setup, TrainedSimplex]:
    """Two spirals, a tiny BatchNorm MLP and an untrained 2-simplex at stale statistics."""
    base = setup(make_config(dataset="two_spirals", architecture="mlp", batch_size=32))
    s = _BatchNormSetup(base.config, base.dataset, base.input_spec, base.num_outputs)
    vertices = []
    for j in range(3):
        torch.manual_seed(j)
        vertices.append({k: v.detach() for k, v in s.make_model().named_parameters()})
    buffers = {k: v.clone() for k, v in s.make_model().named_buffers()}
    buffers["1.running_mean"] += 3.0  # any statistics but a draw's own
    return s, TrainedSimplex(vertices, buffers, [])


def test_drawn_members_carry_the_trainers_batchnorm(bn_setup) -> None:
    s, simplex = bn_setup
    config, x = s.config, s.dataset.test.x
    draws = draw_members(config, s.make_model(), [simplex], s.training_data)
    trainers = member_states([simplex], draws)
    expected = ReferenceEngine(s.make_model(), trainers, s.input_spec).outputs(x)
    members, alphas = draw(
        s, simplex.vertices, simplex.buffers, config.draws.per_simplex, config.seed, 0
    )
    assert [tuple(a.tolist()) for a in alphas] == [d.alpha for d in draws[0]]
    torch.testing.assert_close(member_outputs(s, members, x), expected, atol=1e-5, rtol=0)
    stale = [{**mix_vertices(simplex.vertices, a), **simplex.buffers} for a in alphas]
    without = ReferenceEngine(s.make_model(), stale, s.input_spec).outputs(x)
    assert (without - expected).abs().max() > 0.1


def test_modes_keep_their_buffers_and_bare_parameters_are_refused(bn_setup) -> None:
    s, simplex = bn_setup
    (mode,) = mode_states([simplex])
    assert torch.equal(mode["1.running_mean"], simplex.buffers["1.running_mean"])
    with pytest.raises(ValueError, match="lacks the buffers"):
        member_outputs(s, [dict(simplex.vertices[0])], s.dataset.test.x)


def test_cli_lists_experiments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS)


def test_cli_does_not_import_matplotlib() -> None:
    code = "import sys, training.cli; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_experiment_is_an_error() -> None:
    assert main(["experiment", "no-such-experiment"]) == 2


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_report_json_and_figures(name: str, outputs: dict) -> None:
    report, payload = outputs[name]
    text = report.read_text()
    assert text.startswith("# ") and "Command: `espro experiment" in text
    assert payload["experiment"] == name and payload["quick"] is True
    assert payload["wall_seconds"] > 0 and payload["machine"]["cpu_cores_available"] >= 1
    assert payload["figures"], "every experiment draws at least one figure"
    for figure in payload["figures"]:
        assert (report.parent / figure).stat().st_size > 1000
        assert f"]({figure})" in text
    assert all(math.isfinite(v) for v in _numbers(payload["results"]))


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def test_ensembles_numbers(outputs: dict) -> None:
    results = outputs["ensembles"][1]["results"]
    for name, entry in results.items():
        for cell in entry["cells"]:
            for scaling in ("raw", "calibrated"):
                m = cell[scaling]
                assert 0 <= m["error"] <= 1 and 0 <= m["ece"] <= 1 and 0 <= m["brier"] <= 2
                assert math.isfinite(m["nll"]) and m["nll"] > 0
            assert cell["train_seconds"] > 0
            assert "temperature_warning" in cell
        assert entry["scale_fit"]
        for rival in entry["comparison"]["equal_cost"]:
            if rival["rival_modes"] is not None:
                assert rival["rival_seconds"] >= rival["seconds"]
        if name == "digits":  # learns within the quick size
            best = min(c["calibrated"]["error"] for c in entry["cells"])
            assert best < 0.9, "an ensemble no better than chance"


def _cell(modes: int, order: int, seconds: float, nll: float) -> dict[str, Any]:
    metrics = {"error": nll / 4, "nll": nll, "ece": 0.01, "brier": nll / 2}
    return {"modes": modes, "order": order, "train_seconds": seconds, "calibrated": metrics}


def test_equal_cost_rival_took_at_least_as_long() -> None:
    from training.experiments.ensembles import _comparison

    cells = [_cell(1, 0, 1.0, 0.9), _cell(2, 0, 2.0, 0.8), _cell(1, 1, 1.5, 0.85)]
    cells += [_cell(2, 1, 3.0, 0.5)]
    comparison = _comparison(cells)
    rows = {(r["modes"], r["order"]): r for r in comparison["equal_cost"]}
    assert rows[1, 1]["rival_modes"] == 2  # not the cheaper single model
    assert rows[1, 1]["rival_time_ratio"] == pytest.approx(2.0 / 1.5)
    assert rows[2, 1]["rival_modes"] is None  # longer than the largest deep ensemble
    assert rows[2, 1]["nll_delta"] is None
    summary = comparison["summary"]
    assert summary["equal_cost_cells"] == 1 and summary["espro_better_nll_equal_cost"] == 0
    assert summary["espro_better_nll_same_modes"] == 2


def test_shift_numbers(outputs: dict) -> None:
    results = outputs["shift"][1]["results"]
    assert {"gaussian_noise", "masking", "translation", "blur"} <= set(results["corruptions"])
    assert set(results["temperature_warnings"]) == set(results["temperature"])
    assert sum(results["lowest_nll_counts"].values()) == sum(results["highest_nll_counts"].values())
    for entry in results["corruptions"].values():
        for by_method in entry["severities"].values():
            assert set(by_method) == {"single", "deep_ensemble", "espro"}
            for m in by_method.values():
                assert 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1 and math.isfinite(m["nll"])


def test_spro_complex_numbers(outputs: dict) -> None:
    results = outputs["spro-complex"][1]["results"]
    assert set(results["complexes"]) == {"2 modes", "3 modes"}
    for entry in results["complexes"].values():
        assert _finite(entry["log_volume"]["simplexes"] + [entry["log_volume"]["complex"]])
        for sc in entry["simplexes"]:
            assert all(0 <= a <= 1 for a in sc["train"]["accuracy"] + sc["test"]["accuracy"])
            assert _finite(sc["train"]["loss"])
        assert entry["planes"] and 0 <= entry["ensemble_test_accuracy"] <= 1


def test_dimensionality_numbers(outputs: dict) -> None:
    results = outputs["dimensionality"][1]["results"]
    assert [s["connecting_vertices"] for s in results["steps"]] == [1, 2]
    for step in results["steps"]:
        assert math.isfinite(step["log_volume_complex"])
        assert all(h > 0 for h in step["new_vertex_height"])  # the volume is positive
        assert 0 <= step["draw_train_accuracy_min"] <= step["draw_train_accuracy_mean"] <= 1


def test_diversity_numbers(outputs: dict) -> None:
    results = outputs["diversity"][1]["results"]
    assert len(results["alphas"][0]) == 4  # a tetrahedron
    assert math.isfinite(results["log_volume"])
    assert 0 <= results["mean_pairwise_disagreement_grid"] <= 1
    assert 0 <= results["ensemble_test_accuracy"] <= 1


def test_regression_numbers(outputs: dict) -> None:
    methods = outputs["regression"][1]["results"]["methods"]
    assert len(methods) == 3
    for r in methods.values():
        assert _finite([r["test_log_likelihood_calibrated"], r["test_rmse"]])
        assert r["mean_std_in_gaps"] > 0 and r["mean_std_in_clusters"] > 0


def test_draws_numbers(outputs: dict) -> None:
    results = outputs["draws"][1]["results"]
    for entry in results["draws"].values():
        assert 0 <= entry["error"]["mean"] <= 1 and math.isfinite(entry["nll"]["mean"])
