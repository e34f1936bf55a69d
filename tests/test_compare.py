"""``espro compare``: the statistics on fixed numbers, and one real run on a tiny config whose
deep-ensemble and ESPRO numbers are checked against direct evaluation and ``espro train``'s."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from helpers import TINY
from serving.bundle import load_bundle
from serving.cli import main
from serving.manifest import Task, buffer_key
from serving.predictor import Predictor
from training.compare_summary import BASELINES, CLAIMS, report, summarize
from training.config import parse_config
from training.data import load_dataset
from training.evaluation import fit_checked_scale, score
from training.splits import split_outputs
from training.stats import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    ONE_SEED,
    VERDICTS,
    Interval,
    paired_difference,
    t_interval,
    verdict,
)

T_975_2 = 4.302652729749462
"""Student's t quantile 0.975 at 2 degrees of freedom (tables give 4.303)."""


def test_t_interval_of_three_values():
    interval = t_interval([1.0, 2.0, 3.0])  # mean 2, standard deviation 1
    half = T_975_2 / 3**0.5
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.low == pytest.approx(2 - half) and interval.high == pytest.approx(2 + half)
    assert interval.half_width == pytest.approx(half)


def test_one_value_has_no_interval_and_no_verdict():
    interval = t_interval([0.7])
    assert (interval.mean, interval.low, interval.high) == (0.7, None, None)
    assert verdict(paired_difference([0.1], [0.9])) == ONE_SEED


def test_paired_difference_pairs_by_seed():
    # Seed-to-seed spread is large, the paired difference constant: the claim holds.
    diff = paired_difference([0.5, 1.5, 2.5], [0.6, 1.6, 2.6])
    assert diff.mean == pytest.approx(-0.1)
    assert diff.low == pytest.approx(-0.1) and diff.high == pytest.approx(-0.1)
    assert verdict(diff) == HOLDS
    assert verdict(t_interval([-0.1, 1.6, 2.6])) == INCONCLUSIVE
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (-0.3, -1e-12, HOLDS),
        (-0.3, 0.0, INCONCLUSIVE),  # the interval touches 0: not below it
        (-0.3, 0.2, INCONCLUSIVE),
        (0.0, 0.3, INCONCLUSIVE),
        (1e-12, 0.3, DOES_NOT_HOLD),
    ],
)
def test_verdict_boundaries(low, high, expected):
    assert verdict(Interval((low + high) / 2, low, high, 5)) == expected


# --------------------------------------------------------------------------- a real run

CONFIG = TINY | {"draws": {"per_simplex": 2}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    (root / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    argv = ["compare", str(root / "tiny.yaml"), "--seeds", "2", "--out", str(root / "out")]
    assert main(argv) == 0
    return root, argv, json.loads((root / "out" / "results.json").read_text())


def test_compare_writes_the_evidence(run):
    root, _, results = run
    out = root / "out"
    assert (out / "cost.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "## Verdicts" in text and "DE(2)" in text and "ESPRO(2, 1)" in text
    assert not (out / "work").exists()  # checkpoints go once the seeds are done
    assert [r["seed"] for r in results["seeds"]] == [0, 1]
    assert results["command"].startswith("espro compare ") and results["config"]["seed"] == 3
    assert "commit" in results
    for record in results["seeds"]:
        modes, de_modes = record["modes"], record["de_modes"]
        assert modes == 2 and de_modes >= modes and record["shared_modes"]
        espro = load_bundle(record["bundles"]["espro"]).manifest.training
        de = load_bundle(record["bundles"]["de"]).manifest.training
        assert record["cost"]["espro"] == espro["cost"]["total"]
        passes = [v[0]["passes"] for v in de["vertices"]]
        assert len(passes) == de_modes
        # M' is ESPRO's passes counted in modes, rounded.
        mode_passes = sum(passes[:modes]) / modes  # ESPRO's modes, shared with the DE
        assert de_modes == max(modes, round(espro["cost"]["total"]["passes"] / mode_passes))
        for m in range(1, de_modes + 1):
            assert record["cost"][f"de{m}"]["passes"] == sum(passes[:m])
    differences = results["summary"]["differences"]
    assert {d["verdict"] for d in differences} <= set(VERDICTS) - {ONE_SEED}
    claims = {(d["baseline"], d["metric"]) for d in differences if d["claim"]}
    assert claims == {(b, k) for b in BASELINES for k in CLAIMS[Task.CLASSIFICATION]}


def test_deep_ensemble_of_m_modes_matches_direct_evaluation(run):
    """DE(M) as compare scores it is the first M modes of the DE bundle, scored directly."""
    _, _, results = run
    record = results["seeds"][0]
    bundle = load_bundle(record["bundles"]["de"])
    dataset = load_dataset(parse_config(results["config"]).data)
    predictor = Predictor(bundle)
    names = bundle.manifest.buffer_names
    members = predictor.add_members(
        [
            {**bundle.vertices(m)[0], **{n: bundle.tensors[buffer_key(m, n)] for n in names}}
            for m in range(record["modes"])
        ]
    )
    val, check = dataset.val, dataset.calibration

    def outputs(x: torch.Tensor) -> torch.Tensor:
        return predictor.member_outputs(x, members)

    scale, _ = fit_checked_scale(
        Task.CLASSIFICATION,
        split_outputs(outputs, val),
        val.y,
        split_outputs(outputs, check),
        check.y,
    )
    test = split_outputs(outputs, dataset.test)
    scored = record["scores"][f"de{record['modes']}"]["clean"]
    assert record["scale"][f"de{record['modes']}"] == pytest.approx(scale)
    for scaling, temperature in (("raw", 1.0), ("calibrated", scale)):
        direct = score(Task.CLASSIFICATION, test, dataset.test.y, temperature)
        assert {k: scored[scaling][k] for k in direct} == pytest.approx(direct)
        assert scored[scaling]["error"] == pytest.approx(1 - direct["accuracy"])


def test_numbers_agree_with_what_espro_train_evaluated(run):
    """ESPRO and DE(M) on clean and noisy inputs are ``espro train``'s own ESPRO and deep
    ensemble: same members, same temperatures, same noise."""
    _, _, results = run
    for record in results["seeds"]:
        stored = load_bundle(record["bundles"]["espro"]).manifest.metrics
        ours = record["scores"]
        settings = {"clean": stored["test"]} | {
            f"noise {float(s):g}": v for s, v in stored["shift"]["gaussian_noise"].items()
        }
        for setting, theirs in settings.items():
            for method, key in (("espro", "espro"), ("deep_ensemble", f"de{record['modes']}")):
                for scaling in ("raw", "calibrated"):
                    want = theirs[method][scaling]
                    got = {k: ours[key][setting][scaling][k] for k in want}
                    assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (setting, method)


def test_a_rerun_reuses_the_bundles(run, caplog):
    root, argv, results = run
    with caplog.at_level(logging.INFO, logger="training"):
        assert main(argv) == 0
    assert "training ESPRO" in caplog.text and "mode 0 vertex 0" not in caplog.text
    assert caplog.text.count("reusing") == 4
    again = json.loads((root / "out" / "results.json").read_text())
    assert again["summary"]["differences"] == results["summary"]["differences"]


def test_one_seed_is_inconclusive_and_reported(run):
    _, _, results = run
    records = results["seeds"][:1]
    summary = summarize(records, Task.CLASSIFICATION)
    assert {d["verdict"] for d in summary["differences"]} == {ONE_SEED}
    text = report(results | {"seeds": records, "summary": summary})
    assert ONE_SEED in text and "1 of 2 seeds" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-de-modes", "1"], "--max-de-modes"),
        (["--seeds", "0"], "--seeds"),
        (["--seed-list", "1", "1"], "distinct"),
    ],
)
def test_refusals_are_one_line(tmp_path, capsys, extra, message):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["compare", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_deep_ensemble_config_is_refused(tmp_path, capsys):
    config = CONFIG | {"simplex": {**CONFIG["simplex"], "vertices": 0}}
    (tmp_path / "de.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", str(tmp_path / "de.yaml"), "--out", str(tmp_path)]) == 2
    assert "simplex.vertices" in capsys.readouterr().err


def test_the_equal_time_rival_is_the_most_modes_trained_within_espros_seconds():
    from training.compare_summary import equal_time_modes

    def record(espro: float, modes: list[float]) -> dict:
        cost = {"espro": {"seconds": espro}} | {
            f"de{m}": {"seconds": s} for m, s in enumerate(modes, start=1)
        }
        return {"de_modes": len(modes), "cost": cost}

    assert equal_time_modes(record(25.0, [10.0, 20.0, 30.0])) == 2
    assert equal_time_modes(record(99.0, [10.0, 20.0, 30.0])) == 3  # at most M'
    assert equal_time_modes(record(5.0, [10.0, 20.0, 30.0])) == 1  # at least one mode
