"""The ``espro`` command line on a tiny config: train, evaluate, predict and their errors;
the commands of both sides, and the serving side without the training extra."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import TINY
from serving.bundle import load_bundle
from serving.cli import main, read_inputs
from serving.errors import InputError
from serving.predictor import Predictor
from training.cli import TRAINING_EXTRA

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
WITHOUT_TRAINING_EXTRA = (
    f"import sys\nsys.modules.update(dict.fromkeys({TRAINING_EXTRA!r}))\n"
    "from serving.cli import main\nsys.exit(main(sys.argv[1:]))\n"
)
"""``espro`` as where only ``espro[serving]`` is installed: the extra's modules do not import."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["train", str(root / "tiny.yaml"), "-o", str(root / "bundle")]) == 0
    return root


def test_train_prints_the_comparison_and_removes_its_checkpoints(trained, capsys):
    assert (trained / "bundle" / "manifest.json").exists()
    assert not (trained / "bundle.work").exists()
    assert main(["train", str(trained / "tiny.yaml"), "-o", str(trained / "bundle")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_evaluate_prints_tables_and_writes_json(trained, capsys):
    out = trained / "results.json"
    assert main(["evaluate", str(trained / "bundle"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| espro | calibrated |" in printed and "Gaussian noise" in printed
    results = json.loads(out.read_text())
    assert set(results["test"]) == {"single", "deep_ensemble", "espro"}


def test_report_aggregates_runs_over_seeds(trained, capsys):
    assert (
        main(["train", str(trained / "tiny.yaml"), "--seed", "11", "-o", str(trained / "seed11")])
        == 0
    )
    assert load_bundle(trained / "seed11").manifest.training["config"]["seed"] == 11
    capsys.readouterr()
    assert main(["report", str(trained / "bundle"), str(trained / "seed11")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 run(s)")
    espro_row = next(line for line in out.splitlines() if line.startswith("| espro | raw |"))
    assert espro_row.count("±") == 7  # five metrics, the training passes and seconds
    assert main(["report", str(trained / "bundle")]) == 0
    assert "±" not in capsys.readouterr().out


def test_predict_json_matches_the_predictor(trained, capsys):
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    np.save(trained / "x.npy", x)
    assert main(["predict", str(trained / "bundle"), str(trained / "x.npy"), "--json"]) == 0
    response = json.loads(capsys.readouterr().out)
    predictor = Predictor.from_path(trained / "bundle")
    expected = predictor.predict(torch.from_numpy(x))
    assert response["model_name"] == "tiny" and response["bundle_sha256"] == predictor.bundle.digest
    got = np.array([p["probabilities"] for p in response["predictions"]])
    np.testing.assert_allclose(got, expected.probs.numpy(), atol=1e-6)
    first = response["predictions"][0]
    assert {
        "label",
        "class_name",
        "confidence",
        "entropy",
        "expected_entropy",
        "mutual_information",
        "prediction_set",
        "abstain",
    } <= set(first)


def test_predict_table_and_draws(trained, capsys):
    (trained / "x.json").write_text(json.dumps({"inputs": [[0.1, 0.2], [1.0, -1.0]]}))
    assert main(["predict", str(trained / "bundle"), str(trained / "x.json"), "--draws", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["#", "class_name", "confidence"]
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["predict", "{bundle}", "{bad_shape}"],
            "bad_shape.npy: expected inputs of shape [batch, 2]",
        ),
        (["predict", "{bundle}", "{x}", "--draws", "9"], "--draws: draws must be between 1 and 3"),
        (["predict", "{root}", "{x}"], "manifest.json is missing"),
        (["predict", "{bundle}", "{x}", "--device", "foo"], "--device: 'foo' is not a device"),
        (["evaluate", "{bundle}", "--device", "cuda:x"], "--device: 'cuda:x' is not a device"),
        (["evaluate", "{bundle}", "--json", "{root}/no/such/dir.json"], "--json: "),
        (["train", "{bad_config}"], "modes.epochs"),
        (["configs", "nope"], "no built-in config"),
        (["train", "{config}", "--lambda", "-1"], "simplex.lambda"),
        (["serve", "{bundle}", "--max-batch-size", "300"], "must be at least max_batch_size (300)"),
    ],
)
def test_bad_input_exits_2_with_a_message(trained, capsys, argv, message):
    np.save(trained / "bad_shape.npy", np.zeros((2, 3), dtype=np.float32))
    np.save(trained / "x.npy", np.zeros((2, 2), dtype=np.float32))
    (trained / "bad.yaml").write_text("modes:\n  epochs: -1\n")
    paths = {
        "config": trained / "tiny.yaml",
        "bundle": trained / "bundle",
        "bad_shape": trained / "bad_shape.npy",
        "x": trained / "x.npy",
        "root": trained,
        "bad_config": trained / "bad.yaml",
    }
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert message in err


def test_read_inputs_refuses_pickled_arrays(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="allow_pickle"):
        read_inputs(tmp_path / "objects.npy")
    (tmp_path / "ragged.json").write_text("[[1, 2], [3]]")
    with pytest.raises(InputError, match="cannot read inputs"):
        read_inputs(tmp_path / "ragged.json")


def test_configs_lists_and_prints_builtins(capsys):
    assert main(["configs"]) == 0
    assert "mnist1d-demo" in capsys.readouterr().out.split()
    assert main(["configs", "mnist1d-demo"]) == 0
    assert "simplex:" in capsys.readouterr().out


def test_espro_help_lists_the_commands_of_both_sides(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = re.search(r"\{(.*)\}", capsys.readouterr().out).group(1).split(",")
    serving = ["predict", "serve"]
    training = ["train", "evaluate", "report", "compare", "experiment", "configs", "demo"]
    assert sorted(listed) == sorted(serving + training)


def _without_training_extra(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", WITHOUT_TRAINING_EXTRA, *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("argv", [["train", "tiny.yaml"], ["configs"], ["report", "runs/a"]])
def test_a_training_command_without_its_extra_is_refused_in_one_line(argv):
    result = _without_training_extra(*argv)
    assert result.returncode == 2, result.stderr
    needs = f"error: espro {argv[0]} needs the training extra: pip install 'espro[train]'\n"
    assert result.stderr == needs and result.stdout == ""


def test_predict_and_serve_need_no_training_extra(tiny_bundle_dir, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    result = _without_training_extra("predict", tiny_bundle_dir, tmp_path / "x.npy", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["predictions"]) == 2
    result = _without_training_extra("serve", "--help")
    assert result.returncode == 0 and "--max-batch-size" in result.stdout, result.stderr


def test_the_training_extra_is_what_pyproject_installs():
    """:data:`training.cli.TRAINING_EXTRA`, by import name, is the ``train`` extra's
    distributions: the check that a training command makes is the extra."""
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["train"]
    declared = {re.match(r"[\w.-]+", spec).group().lower() for spec in extra}
    names = packages_distributions()
    installed = {dist.lower() for module in TRAINING_EXTRA for dist in names[module]}
    assert installed == declared
