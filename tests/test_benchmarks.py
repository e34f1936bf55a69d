"""The serving benchmark's load generator and report, against the session's server (``server``
in conftest.py): every door is answered, the counts add up, and the report has its fields.

KServe is not tested here: its peer needs its own virtual environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from helpers import INPUT_SHAPE, Server, benchmark_module

IMAGES = 3


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("serving_load") as module:
        yield module


@pytest.fixture(scope="module")
def loadgen(bench: ModuleType) -> Iterator[Any]:
    with bench.LoadGenerator(max(os.sched_getaffinity(0))) as generator:
        yield generator


@pytest.fixture(scope="module")
def measured(bench: ModuleType, loadgen: Any, server: Server) -> list[dict[str, Any]]:
    """One second of load at concurrency 2 over every door of the server, and the in-process
    engine at the batch the server would form."""
    endpoint = bench.Endpoint(
        server.http, server.grpc, "tiny", INPUT_SHAPE, server.direct, server.direct_http
    )
    cells = [bench.GridCell(concurrency=2, images=IMAGES)]
    timing = bench.Timing(warmup_s=0.3, duration_s=1.0, timeout_s=20.0)
    espro = bench.door_cells(
        loadgen, "espro", "tiny", "reference", endpoint, bench.DOORS, cells, timing,
        lambda _: None, server=lambda: bench.ray_processes(loadgen),
    )  # fmt: skip
    engine = bench.engine_cells(
        server.bundles["tiny/2"], "tiny", "reference", cells, timing, lambda _: None
    )
    return espro + engine


def test_load_generator_runs_pinned_to_one_core(loadgen: Any) -> None:
    assert os.sched_getaffinity(loadgen.process.pid) == {loadgen.core}


def test_the_servers_processes_are_rays_without_the_load_generator(
    bench: ModuleType, loadgen: Any, server: Server
) -> None:
    processes = bench.ray_processes(loadgen)
    assert loadgen.process.pid not in processes and os.getpid() not in processes
    names = {Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in processes}
    assert any(name.startswith(b"ray::ServeReplica:espro") for name in names), names
    assert set(bench.cpu_seconds(processes)) <= set(processes)


def test_every_door_is_answered_and_the_counts_add_up(
    bench: ModuleType, measured: list[dict[str, Any]]
) -> None:
    doors = [cell for cell in measured if cell["target"] == "espro"]
    assert [cell["door"] for cell in doors] == list(bench.DOORS)
    for cell in doors:
        assert cell["errors"] == {}, cell
        assert cell["requests"] > 0 and cell["sent"] == cell["ok"] + sum(cell["errors"].values())
        assert cell["requests"] <= cell["ok"]  # answers in the window, of all answers
        assert cell["images"] == cell["requests"] * IMAGES
        assert cell["images_per_s"] == pytest.approx(cell["requests_per_s"] * IMAGES)
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert cell["loadgen_cpu_percent"] > 0
        assert 0 < cell["server_cpu_ms_per_request"] < 1e3 * cell["seconds"] * os.cpu_count()


def test_the_engine_runs_the_batch_the_server_would_form(
    measured: list[dict[str, Any]],
) -> None:
    (engine,) = [cell for cell in measured if cell["target"] == "engine"]
    assert engine["batch_rows"] == 2 * IMAGES  # two requests of three images
    assert engine["calls"] >= 3 and engine["images_per_s"] > 0
    assert engine["p50_ms"] <= engine["p99_ms"]


def test_a_door_that_refuses_is_recorded_with_its_reason(
    bench: ModuleType, loadgen: Any, server: Server
) -> None:
    endpoint = bench.Endpoint(
        server.http, server.grpc, "no-such-model", INPUT_SHAPE, server.direct, server.direct_http
    )
    timing = bench.Timing(warmup_s=0.0, duration_s=0.1, timeout_s=20.0)
    cells = bench.door_cells(
        loadgen, "espro", "no-such-model", "reference", endpoint, bench.DOORS,
        [bench.GridCell(2, 1)], timing, lambda _: None,
    )  # fmt: skip
    reasons = [cell["skipped"] for cell in cells]
    assert [reason.split(":")[0] for reason in reasons] == [
        "the door answers NOT_FOUND" if door.startswith("grpc") else "the door answers 404"
        for door in bench.DOORS
    ]
    assert all("no-such-model" in reason for reason in reasons)


def test_the_report_has_its_fields_and_ratios(
    bench: ModuleType, measured: list[dict[str, Any]], tmp_path: Path
) -> None:
    args = bench.parse_args(["--quick", "--out", str(tmp_path / "out.json")])
    report = json.loads(json.dumps(bench.summary(args, measured, {}, os.getloadavg(), 1.0)))
    assert {"machine", "loadavg_before", "loadavg_after", "settings", "cells", "ratios"} <= set(
        report
    )
    assert {"cpu", "nproc", "torch", "threads"} <= set(report["machine"])
    for cell in report["cells"]:
        assert {
            "target", "model", "door", "concurrency", "images_per_request", "requests",
            "images_per_s", "p50_ms", "p99_ms",
        } <= set(cell)  # fmt: skip
    assert [row["door"] for row in report["ratios"]] == list(bench.DOORS)
    for row in report["ratios"]:
        assert row["server_over_engine"] > 0 and row["server_over_grpc"] > 0
        assert row["server_over_kserve"] is None and row["server_over_mlserver"] is None
    table = bench.markdown(report)
    assert table.count("\n| tiny | reference |") == len(bench.DOORS)  # a row per measured door
    assert "| – |" in table  # no peer ratio without a peer


def test_the_concurrency_128_target_compares_with_c32_and_needs_every_answer(
    bench: ModuleType,
) -> None:
    def cell(concurrency: int, images_per_s: float, **errors: int) -> dict[str, Any]:
        return {
            "target": "espro", "model": "cnn", "engine": "fused", "door": "grpc",
            "concurrency": concurrency, "images_per_request": 1, "images_per_s": images_per_s,
            "requests_per_s": images_per_s, "p99_ms": 100.0, "errors": errors,
        }  # fmt: skip

    def c128_target(*cells: dict[str, Any]) -> dict[str, Any]:
        (target,) = [t for t in bench.targets(bench.ratios(cells)) if "c=128" in t["target"]]
        return target

    met = c128_target(cell(32, 100.0), cell(128, 95.0))
    assert met["ratio"] == pytest.approx(0.95) and met["met"] is True
    assert c128_target(cell(32, 100.0), cell(128, 85.0))["met"] is False
    assert c128_target(cell(32, 100.0), cell(128, 95.0, UNAVAILABLE=1))["met"] is False
    assert c128_target(cell(128, 95.0))["met"] is None  # no c = 32 cell to compare with


def test_direct_doors_are_compared_with_the_peers_door_of_the_same_requests(
    bench: ModuleType,
) -> None:
    def cell(target: str, engine: str, door: str, images_per_s: float) -> dict[str, Any]:
        return {
            "target": target, "model": "cnn", "engine": engine, "door": door, "concurrency": 32,
            "images_per_request": 1, "images_per_s": images_per_s, "requests_per_s": images_per_s,
            "p99_ms": 100.0, "errors": {},
        }  # fmt: skip

    rows = bench.ratios(
        [
            cell("espro", "fused", "grpc", 100.0),
            cell("espro", "fused", "grpc-direct", 200.0),
            cell("espro", "fused", "rest-binary-direct", 90.0),
            cell("espro", "fused", "rest-json", 60.0),
            cell("kserve", "member-loop", "grpc", 50.0),
            cell("kserve", "member-loop", "rest-binary", 30.0),
            cell("mlserver", "fused", "grpc", 80.0),
            cell("mlserver", "onnx", "grpc", 10.0),  # another engine: not fused's peer
        ]
    )
    ratios = {row["door"]: row for row in rows}
    assert {door: row["server_over_kserve"] for door, row in ratios.items()} == {
        "grpc": pytest.approx(2.0),
        "grpc-direct": pytest.approx(4.0),
        "rest-binary-direct": pytest.approx(3.0),
        "rest-json": None,
    }
    assert ratios["grpc-direct"]["server_over_mlserver"] == pytest.approx(2.5)
    assert ratios["rest-binary-direct"]["server_over_grpc"] == pytest.approx(0.9)
    (rest_binary,) = [t for t in bench.targets(rows) if "REST binary" in t["target"]]
    assert rest_binary["door"] == "rest-binary-direct" and rest_binary["met"] is True


def test_a_slow_models_cells_last_four_rounds_and_the_longest_are_skipped(
    bench: ModuleType,
) -> None:
    timing = bench.Timing(warmup_s=2.0, duration_s=6.0, timeout_s=60.0)
    rates = {1: 100.0, 32: 8.0}  # the engine's images/s at 1 and 32 rows
    fast, slow, slowest = bench.fitted(bench.grid([1, 32, 128], [1]), rates, timing, 60.0)
    assert fast.skipped is None and fast.timing == timing  # the run's timing is long enough
    assert slow.skipped is None and slow.timing == bench.Timing(4.0, 16.0, 60.0)  # 4 s rounds
    assert slowest.timing is None
    assert slowest.skipped.startswith("one round of 128 images takes 16.0 s")
    assert "--max-window 60 s" in slowest.skipped


def test_the_engine_skips_a_cell_whose_rounds_would_outlast_the_window(
    bench: ModuleType, server: Server
) -> None:
    timing = bench.Timing(warmup_s=0.0, duration_s=0.05, timeout_s=20.0)
    cells = [bench.GridCell(128, 16), bench.GridCell(1, 1)]
    big, small = bench.engine_cells(
        server.bundles["tiny/2"], "tiny", "reference", cells, timing, lambda _: None,
        max_window_s=1e-6,
    )  # fmt: skip
    assert small["images_per_s"] > 0  # the smallest batch runs first, whatever it costs
    assert big["concurrency"] == 128 and big["skipped"].startswith("one round of 2048 images")
    assert "images_per_s" not in big
