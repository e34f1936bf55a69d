"""Tests for the ``auto`` engine: its choice under made-up timings (never this machine's speed),
its answers, its budget and what it reports."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import tiny_bundle
from serving.app.metrics import ServerMetrics
from serving.bundle import Bundle, load_bundle
from serving.engine import EngineSpec, parse_engine
from serving.engine import auto as auto_module
from serving.engine.auto import AutoEngine, range_labels
from serving.engine.base import Engine
from serving.engine.fused import FusedEngine
from serving.engine.onnx import OnnxEngine
from serving.engine.reference import ReferenceEngine
from serving.engine.shortcut import ShortcutEngine
from serving.predictor import Predictor
from serving.service import ModelRepository

Costs = Mapping[str, Mapping[int, float | Exception]]
"""Made-up seconds of one call (or what it raises), by engine and batch rows."""


def kind(engine: Engine) -> str:
    """The candidate's engine string on the CPU, from its class and precision."""
    name = {
        ShortcutEngine: "shortcut",
        FusedEngine: "fused",
        OnnxEngine: "onnx",
        ReferenceEngine: "reference",
    }[type(engine)]
    precision = {torch.bfloat16: ":bf16", torch.float16: ":fp16"}
    return name + precision.get(getattr(engine, "dtype", torch.float32), "")


class FakeTimer:
    """Stands in for :func:`serving.engine.auto.time_call`: runs nothing, returns ``costs``
    (a candidate's first call costs ``first`` where given) and records every call."""

    def __init__(self, costs: Costs, first: float | None = None) -> None:
        self.costs, self.first = costs, first
        self.calls: list[tuple[str, int, float]] = []
        self.charged = 0.0
        """Seconds of every call but each candidate's first."""

        self.engines: dict[str, weakref.ref[Engine]] = {}

    def __call__(self, engine: Engine, x: torch.Tensor) -> float:
        name = kind(engine)
        self.engines[name] = weakref.ref(engine)
        seen = any(called == name for called, _, _ in self.calls)
        cost = self.costs[name][len(x)]
        if isinstance(cost, Exception):
            raise cost
        seconds = cost if seen or self.first is None else self.first
        self.calls.append((name, len(x), seconds))
        self.charged += seconds if seen else 0.0
        return seconds


COSTS: Costs = {  # a different winner per range: fused, shortcut, then onnx or the reference
    "reference": {1: 4e-3, 8: 8e-3, 64: 10e-3},
    "fused": {1: 1e-3, 8: 4e-3, 64: 40e-3},
    "shortcut": {1: 2e-3, 8: 2e-3, 64: 20e-3},
    "onnx": {1: 3e-3, 8: 5e-3, 64: 5e-3},
}


def _bundle(tmp_path: Path) -> Bundle:
    # 4 draws on simplexes of 2 and 3 vertices: 8 members, V = 5 < K, so the shortcut mixes.
    return load_bundle(tiny_bundle(draws=4).write(tmp_path / "bundle"))


def _fake(monkeypatch: pytest.MonkeyPatch, costs: Costs, onnx: bool, **timer: Any) -> FakeTimer:
    fake = FakeTimer(costs, **timer)
    monkeypatch.setattr(auto_module, "time_call", fake)
    monkeypatch.setattr(auto_module, "onnx_available", lambda: onnx)
    return fake


def _auto(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    costs: Costs = COSTS,
    *,
    onnx: bool = False,
    engine: str = "auto",
    **kwargs: Any,
) -> tuple[Predictor, AutoEngine]:
    """A predictor whose engine is ``auto``, chosen under ``costs``, and that engine."""
    _fake(monkeypatch, costs, onnx)
    predictor = Predictor(_bundle(tmp_path), engine=engine, **kwargs)
    assert isinstance(predictor.engine, AutoEngine)
    return predictor, predictor.engine


def _direct(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, first: float | None = None, **kwargs: Any
) -> tuple[AutoEngine, FakeTimer]:
    """``AutoEngine(..., **kwargs)`` over the members of the tiny bundle, chosen under
    :data:`COSTS` (without onnx), and its timer."""
    reference = Predictor(_bundle(tmp_path)).engine
    assert isinstance(reference, ReferenceEngine)
    timer = _fake(monkeypatch, COSTS, onnx=False, first=first)
    engine = AutoEngine(
        reference.model,
        reference.members,
        reference.input_spec,
        vertices=reference.vertices,
        origins=reference.origins,
        **kwargs,
    )
    return engine, timer


def _close(
    predictor: Predictor, reference: Predictor, batch: int, draws: int | None = None
) -> None:
    x = 3 * torch.randn(batch, 4, generator=torch.Generator().manual_seed(batch))
    got = predictor.outputs(x, draws).softmax(-1)
    torch.testing.assert_close(got, reference.outputs(x, draws).softmax(-1), atol=1e-5, rtol=0)


def test_auto_parses_with_a_precision_only() -> None:
    assert parse_engine("auto") == EngineSpec("auto")
    assert parse_engine("auto:bf16") == EngineSpec("auto", "bf16")
    with pytest.raises(ValueError, match="auto takes bf16, fp16"):
        parse_engine("auto:graphs")


def test_each_range_of_rows_runs_the_fastest_at_its_measured_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    predictor, engine = _auto(monkeypatch, tmp_path)
    assert engine.choice == {"1-7": "fused", "8-63": "shortcut", "64+": "reference"}
    assert engine.skipped == {"onnx": "onnxruntime is not installed"}
    chosen = {rows: kind(engine.engine_for(rows)) for rows in (1, 7, 8, 63, 64, 500)}
    assert chosen == {
        1: "fused",
        7: "fused",
        8: "shortcut",
        63: "shortcut",
        64: "reference",
        500: "reference",
    }
    assert predictor.engine_choice == engine.choice


def test_every_range_answers_the_references_numbers_fresh_members_included(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    predictor, engine = _auto(monkeypatch, tmp_path, max_fresh_draws=3)
    reference = Predictor(predictor.bundle, max_fresh_draws=3)
    for batch in (1, 5, 8, 40, 64, 100):
        for draws in (None, 2, 6):  # 6: fresh members, added to every kept engine
            _close(predictor, reference, batch, draws)
    lengths = {len(engine.engine_for(rows)) for rows in (1, 8, 64)}
    assert lengths == {predictor.num_members} == {reference.num_members}


def test_kept_engines_share_the_members_materialised_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    predictor, engine = _auto(monkeypatch, tmp_path, max_fresh_draws=1)
    predictor.outputs(torch.zeros(1, 4), draws=5)  # one fresh member per simplex
    fused, shortcut = (engine.engine_for(rows) for rows in (1, 8))
    assert isinstance(fused, FusedEngine) and isinstance(shortcut, ShortcutEngine)
    for index in (0, predictor.num_members - 1):  # a stored member and a fresh one
        first, second = fused.members[index], shortcut.members[index]
        assert all(first[name] is second[name] for name in first)


def test_onnx_is_a_candidate_where_onnxruntime_is_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    predictor, engine = _auto(monkeypatch, tmp_path, onnx=True)
    assert engine.choice == {"1-7": "fused", "8-63": "shortcut", "64+": "onnx"}
    assert all("onnx" in row for row in engine.timings.values()) and not engine.skipped
    reference = Predictor(predictor.bundle)
    for batch in (1, 8, 64, 70):
        _close(predictor, reference, batch)


def test_a_reduced_precision_adds_candidates_only_where_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slow = dict.fromkeys((1, 8, 64), 0.1)
    costs = dict(COSTS) | {"fused:bf16": slow, "shortcut:bf16": slow}
    _, fp32 = _auto(monkeypatch, tmp_path / "a", costs)
    _, bf16 = _auto(monkeypatch, tmp_path / "b", costs, engine="auto:bf16")
    assert set(fp32.timings[1]) == {"reference", "fused", "shortcut"}
    assert set(bf16.timings[1]) == {
        "reference",
        "fused",
        "shortcut",
        "fused:bf16",
        "shortcut:bf16",
    }
    assert bf16.choice == fp32.choice  # slower in bf16 here: the fp32 engines still answer


def test_a_clearly_slower_candidate_is_stopped_after_its_untimed_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine, timer = _direct(monkeypatch, tmp_path)
    # At 8 rows the reference (8 ms) runs after fused (4 ms): its untimed call takes over 1.5
    # times the best median, so it gets no timed call.
    assert engine.timings[8]["shortcut"] == pytest.approx(2e-3)
    assert engine.timings[8]["reference"] is None
    assert [(name, rows) for name, rows, _ in timer.calls].count(("reference", 8)) == 1


def test_only_the_chosen_engines_are_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine, timer = _direct(monkeypatch, tmp_path / "a")
    alive = {name for name, ref in timer.engines.items() if ref() is not None}
    assert alive == {"fused", "shortcut", "reference"} == set(engine.choice.values())
    engine, timer = _direct(monkeypatch, tmp_path / "b", rows=(1,))
    alive = {name for name, ref in timer.engines.items() if ref() is not None}
    assert alive == {"fused"} and engine.choice == {"1+": "fused"}


def test_a_candidate_that_fails_is_left_out_from_that_size_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    costs = dict(COSTS) | {"fused": {1: 1e-3, 8: 4e-3, 64: RuntimeError("out of memory")}}
    _, engine = _auto(monkeypatch, tmp_path, costs)
    assert engine.choice == {"1-7": "fused", "8-63": "shortcut", "64+": "reference"}
    assert "fused" not in engine.timings[64]
    assert engine.skipped["fused"] == "RuntimeError at 64 rows: out of memory"


def test_a_reference_that_fails_refuses_the_bundle_or_ends_the_timing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = dict(COSTS) | {"reference": {1: RuntimeError("broken"), 8: 1.0, 64: 1.0}}
    with pytest.raises(RuntimeError, match="broken"):
        _auto(monkeypatch, tmp_path / "a", broken)
    late = dict(COSTS) | {"reference": {1: 4e-3, 8: 8e-3, 64: RuntimeError("out of memory")}}
    _, engine = _auto(monkeypatch, tmp_path / "b", late)
    assert list(engine.timings) == [1, 8] and engine.choice["8+"] == "shortcut"


def test_the_budget_bounds_the_charged_calls_not_the_preparation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Each candidate's first call (its preparation) takes 5 s, uncharged; 60 ms of charged
    # calls time 1 and 8 rows, and run out at 64.
    budget = 0.06
    engine, timer = _direct(monkeypatch, tmp_path, first=5.0, budget_s=budget)
    longest = max(seconds for _, _, seconds in timer.calls if seconds < 5.0)
    assert engine.spent_s == pytest.approx(timer.charged)
    assert budget <= engine.spent_s <= budget + longest
    assert list(engine.timings) == [1, 8]  # 64 rows ran out of budget: not counted
    assert engine.choice == {"1-7": "fused", "8+": "shortcut"}


def test_the_smallest_size_is_timed_in_full_whatever_the_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A bundle whose one-row calls alone outlast the budget (a large model on a slow CPU)
    # still gets the fastest engine at one row, for every size: larger ones are not timed.
    engine, timer = _direct(monkeypatch, tmp_path, budget_s=1e-6)
    assert list(engine.timings) == [1]
    assert set(engine.timings[1]) == {"reference", "fused", "shortcut"}
    assert engine.choice == {"1+": "fused"}
    assert {rows for _, rows, _ in timer.calls} == {1}


def test_without_a_counted_size_the_reference_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine, _ = _direct(monkeypatch, tmp_path, budget_s=0.0)
    assert engine.timings == {} and engine.choice == {"1+": "reference"}
    assert isinstance(engine.engine_for(64), ReferenceEngine)
    assert "rows 1+: reference (the budget ran out" in engine.describe()


def test_describe_and_the_log_line_name_each_range_with_its_times(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fake(monkeypatch, COSTS, onnx=False)
    path = tiny_bundle(draws=4).write(tmp_path / "bundle")
    with caplog.at_level(logging.INFO, logger="serving.service"):
        repository, _ = ModelRepository.load([str(path)], engine="auto")
    (line,) = [r.getMessage() for r in caplog.records if " engine " in r.getMessage()]
    (predictor,) = repository.predictors()
    assert line == f"tiny:1 engine {predictor.describe_engine()}"
    assert line.startswith("tiny:1 engine auto: rows 1-7: fused 1 ms at 1 (reference 4, ")
    assert "; rows 8-63: shortcut 2 ms at 8 (fused 4, reference slower)" in line
    assert "; rows 64+: reference 10 ms at 64 (shortcut 20, fused slower); timed in " in line
    assert line.endswith("; left out: onnx (onnxruntime is not installed)")


def test_a_fixed_engine_reports_itself_for_every_batch(tmp_path: Path) -> None:
    predictor = Predictor(_bundle(tmp_path), engine="fused:graphs")
    assert predictor.engine_choice == {"1+": "fused:graphs"}
    assert predictor.describe_engine() == "fused:graphs"


def test_the_engine_info_gauge_has_a_series_per_range(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    predictor, _ = _auto(monkeypatch, tmp_path)
    metrics = ServerMetrics()
    series: list[dict[str, str]] = []

    def record(value: float, tags: dict[str, str]) -> None:
        series.append(tags | {"value": str(value)})

    monkeypatch.setattr(metrics.engine_info, "set", record)
    metrics.models([predictor], refused=0)
    model = {"model": "tiny", "version": "1", "value": "1.0"}
    assert series == [
        model | {"batch_range": "1-7", "engine": "fused"},
        model | {"batch_range": "8-63", "engine": "shortcut"},
        model | {"batch_range": "64+", "engine": "reference"},
    ]


def test_range_labels() -> None:
    assert range_labels([1, 8, 64]) == ["1-7", "8-63", "64+"]
    assert range_labels([1, 2]) == ["1", "2+"]
    assert range_labels([1]) == ["1+"]
