"""End to end: tiny configs trained for real (seconds), then loaded, predicted and resumed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_config
from serving.bundle import load_bundle, sha256_file
from serving.manifest import TENSORS_FILE, Task
from serving.predictive import RegressionPrediction
from serving.predictor import Predictor
from training.config import parse_config
from training.errors import CheckpointError
from training.pipeline import train
from training.spro import SimplexTrainer


@pytest.fixture(scope="module")
def tiny_bundle_path(tmp_path_factory):
    path, _ = train(tiny_config(), tmp_path_factory.mktemp("run") / "bundle")
    return path


def test_training_writes_a_complete_bundle(tiny_bundle_path):
    bundle = load_bundle(tiny_bundle_path)
    manifest = bundle.manifest
    assert [s.num_vertices for s in manifest.simplexes] == [2, 2]
    assert [len(s.draws) for s in manifest.simplexes] == [3, 3]
    assert all(s.log_volume is not None and s.log_volume > -1e30 for s in manifest.simplexes)
    assert manifest.class_names == ("arm 0", "arm 1")
    assert manifest.conformal is not None and manifest.abstention is not None
    assert manifest.training["config"]["simplex"]["lambda"] == 0.1
    test = manifest.metrics["test"]
    assert set(test) == {"single", "deep_ensemble", "espro"}
    assert set(test["espro"]["calibrated"]) == {"accuracy", "nll", "brier", "ece", "aurc"}
    assert set(manifest.metrics["shift"]["gaussian_noise"]) == {"0.5"}
    assert test["espro"]["raw"]["accuracy"] > 0.55  # better than chance on two arms
    decisions = manifest.metrics["decisions"]
    assert set(decisions) == {
        "set_coverage",
        "mean_set_size",
        "abstention_rate",
        "selective_accuracy",
    }
    assert 1.0 <= decisions["mean_set_size"] <= 2.0 and 0.0 <= decisions["abstention_rate"] <= 1.0
    # Draws of one simplex are distinct points; their seed is recorded.
    alphas = {d.alpha for d in manifest.simplexes[0].draws}
    assert len(alphas) == 3 and manifest.simplexes[0].draw_seed != manifest.simplexes[1].draw_seed


def test_bundle_predictions_match_the_recorded_metrics(tiny_bundle_path):
    from training.data import load_dataset
    from training.metrics import accuracy

    bundle = load_bundle(tiny_bundle_path)
    config = parse_config(bundle.manifest.training["config"])
    test = load_dataset(config.data).test
    prediction = Predictor(bundle).predict(test.x)
    recorded = bundle.manifest.metrics["test"]["espro"]["calibrated"]["accuracy"]
    assert accuracy(prediction.probs, test.y) == pytest.approx(recorded)


def test_same_seed_same_bundle_and_another_seed_differs(tiny_bundle_path, tmp_path):
    again, _ = train(tiny_config(), tmp_path / "again")
    assert sha256_file(again / TENSORS_FILE) == sha256_file(tiny_bundle_path / TENSORS_FILE)
    assert load_bundle(again).manifest.simplexes == load_bundle(tiny_bundle_path).manifest.simplexes
    other, _ = train(tiny_config(seed=4), tmp_path / "other")
    assert sha256_file(other / TENSORS_FILE) != sha256_file(tiny_bundle_path / TENSORS_FILE)


def test_an_interrupted_run_resumes_from_its_last_vertex(tiny_bundle_path, tmp_path, monkeypatch):
    calls = {"fit_mode": 0, "add_vertex": 0}
    real_fit, real_add = SimplexTrainer.fit_mode, SimplexTrainer.add_vertex

    def counting_fit(self, *args, **kwargs):
        calls["fit_mode"] += 1
        return real_fit(self, *args, **kwargs)

    def interrupted_add(self, *args, **kwargs):
        calls["add_vertex"] += 1
        if calls["add_vertex"] == 2:  # the second mode's vertex: mode 0 is complete
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(SimplexTrainer, "fit_mode", counting_fit)
    monkeypatch.setattr(SimplexTrainer, "add_vertex", interrupted_add)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), tmp_path / "bundle", workdir=work)
    assert not (tmp_path / "bundle").exists()  # no half-written bundle
    assert calls == {"fit_mode": 2, "add_vertex": 2}

    calls.update(fit_mode=0, add_vertex=0)
    monkeypatch.setattr(SimplexTrainer, "add_vertex", real_add)
    path, _ = train(tiny_config(), tmp_path / "bundle", workdir=work)
    assert calls["fit_mode"] == 0  # both modes came from their checkpoints
    assert sha256_file(path / TENSORS_FILE) == sha256_file(tiny_bundle_path / TENSORS_FILE)


def test_runs_that_share_a_workdir_share_the_modes_they_have_in_common(tmp_path, monkeypatch):
    work = tmp_path / "work"
    espro, _ = train(tiny_config(), tmp_path / "espro", workdir=work)
    modes = []
    real_fit = SimplexTrainer.fit_mode

    def counting_fit(self, *args, **kwargs):
        modes.append(kwargs["desc"])
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(SimplexTrainer, "fit_mode", counting_fit)
    # A deep ensemble of three modes trains only its third; its first two are ESPRO's modes.
    de, _ = train(
        tiny_config(modes={"count": 3}, simplex={"vertices": 0}), tmp_path / "de", workdir=work
    )
    assert modes == ["mode 3/3"]
    first, second = load_bundle(espro), load_bundle(de)
    assert torch.equal(first.vertices(1)[0]["1.weight"], second.vertices(1)[0]["1.weight"])
    # A mode's recorded cost travels with its checkpoint.
    assert second.manifest.training["vertices"][1][0] == first.manifest.training["vertices"][1][0]
    # Another seed shares nothing.
    train(tiny_config(seed=9, simplex={"vertices": 0}), tmp_path / "other", workdir=work)
    assert modes == ["mode 3/3", "mode 1/2", "mode 2/2"]


def test_a_checkpoint_without_its_cost_is_refused_in_one_line(tmp_path):
    work = tmp_path / "work"
    config = tiny_config(modes={"count": 1}, simplex={"vertices": 0})
    train(config, tmp_path / "a", workdir=work)
    [saved] = work.glob("*/mode0.vertex0.safetensors")
    save_file({"param:w": torch.zeros(1)}, saved, metadata={"seconds": "1.0"})
    with pytest.raises(CheckpointError, match=r"lacks passes, forward, epochs, final_loss.*delete"):
        train(config, tmp_path / "b", workdir=work)


def test_the_manifest_records_what_every_phase_cost(tiny_bundle_path):
    from training.cost import Cost, cost_table, total

    training = load_bundle(tiny_bundle_path).manifest.training
    config = parse_config(training["config"])
    phases = {p: Cost.from_dict(c) for p, c in training["cost"].items()}
    assert set(phases) == {"modes", "vertices", "batchnorm", "diagnostics", "calibration", "total"}
    assert phases["total"] == total(c for p, c in phases.items() if p != "total")
    [[mode, vertex], _] = training["vertices"]
    n_train = mode["passes"] // config.modes.epochs
    # A vertex's SPRO step averages S samples of the simplex: S passes per example.
    assert vertex["passes"] == config.simplex.epochs * config.simplex.samples * n_train
    assert phases["modes"].passes == 2 * mode["passes"]
    assert phases["batchnorm"] == Cost()  # the MLP has no BatchNorm
    assert phases["calibration"].forward > 0 and phases["total"].seconds > 0
    rows = [line.split("|")[1].strip() for line in cost_table(training["cost"]).splitlines()[2:]]
    assert rows == ["modes", "vertices", "batchnorm", "diagnostics", "calibration", "total"]


def test_an_existing_bundle_is_not_overwritten_by_default(tiny_bundle_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        train(tiny_config(), tiny_bundle_path)


def test_a_deep_ensemble_is_espro_without_extra_vertices(tmp_path):
    _, results = train(tiny_config(simplex={"vertices": 0}), tmp_path / "de")
    manifest = load_bundle(tmp_path / "de").manifest
    assert [(s.num_vertices, len(s.draws)) for s in manifest.simplexes] == [(1, 1), (1, 1)]
    assert results["test"]["espro"]["raw"] == results["test"]["deep_ensemble"]["raw"]


def test_batchnorm_draws_get_their_own_statistics(tmp_path):
    config = tiny_config(
        model={
            "architecture": "helpers:batchnorm_mlp",
            "kwargs": {"hidden": 8},
            "allow_custom": True,
        },
        data={"name": "regression1d", "options": {"n_samples": 200}},
    )
    # Inputs of regression1d are rank 1 with one feature: the custom MLP fits them.
    path, results = train(config, tmp_path / "bn")
    bundle = load_bundle(path)
    manifest = bundle.manifest
    assert manifest.task is Task.REGRESSION and set(results["test"]["espro"]["raw"]) == {
        "nll",
        "rmse",
    }
    assert all(d.batchnorm for s in manifest.simplexes for d in s.draws)
    means = [bundle.buffers(0, s)["1.running_mean"] for s in range(3)]
    assert not torch.allclose(means[0], means[1])
    prediction = Predictor(bundle, allow_custom_architecture=True).predict(torch.zeros(2, 1))
    assert isinstance(prediction, RegressionPrediction) and bool((prediction.variance > 0).all())


def test_a_mode_can_start_from_a_pretrained_state_dict(tmp_path):
    from serving.architectures import create_model

    torch.manual_seed(123)
    pretrained = create_model("mlp", input_shape=(2,), num_outputs=2, hidden=[16])
    state = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    save_file(state, tmp_path / "mode.safetensors")
    config = tiny_config(
        modes={
            "count": 1,
            "init": [str(tmp_path / "mode.safetensors")],
            "lr": 1e-9,
            "momentum": 0.0,
            "weight_decay": 0.0,
        },
        simplex={"vertices": 0},
    )
    path, _ = train(config, tmp_path / "init")
    vertex = load_bundle(path).vertices(0)[0]
    for name, value in vertex.items():
        torch.testing.assert_close(value, state[name], atol=1e-6, rtol=0)
    # A state_dict of another architecture is refused, naming what is missing.
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "wrong.safetensors")
    bad = tiny_config(modes={"count": 1, "init": [str(tmp_path / "wrong.safetensors")]})
    with pytest.raises(ValueError, match="lacks parameters"):
        train(bad, tmp_path / "bad")
