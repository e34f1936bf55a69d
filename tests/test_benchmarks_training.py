"""``benchmarks/training_throughput.py --quick``: every cell trains through the real loading
path and the report has a positive rate and a ratio for each, 1.0 for the in-memory fp32
baseline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from helpers import benchmark_module

CELLS = [
    ("memory", None, "fp32"),
    ("memory", None, "bf16"),
    ("streamed", 0, "fp32"),
    ("streamed", 0, "bf16"),
    ("streamed", 2, "fp32"),
    ("streamed", 2, "bf16"),
]


@pytest.fixture(scope="module")
def benchmark() -> Iterator[ModuleType]:
    with benchmark_module("training_throughput") as module:
        yield module


def test_quick_run_reports_every_cell(benchmark: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    threads = torch.get_num_threads()
    try:  # one thread: seconds long on a machine busy with other work
        benchmark.main(["--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["command"].endswith(f"--quick --threads 1 --out {out}")
    assert report["data"]["images"] == 60 and report["data"]["size"] == [8, 8]
    assert report["training"] == {
        "epochs": 1,
        "batch_size": 128,
        "lr": benchmark.LR,
        "threads": 1,
        "repeats": 1,
    }
    assert isinstance(report["machine"]["native_bf16"], bool | None)
    results = report["results"]
    assert [(r["source"], r["workers"], r["precision"]) for r in results] == CELLS
    assert report["baseline"] == results[0]["cell"]
    assert results[0]["ratio_to_baseline"] == 1.0
    for r in results:
        assert r["examples_per_s"] > 0 and r["ratio_to_baseline"] > 0
        assert r["train_examples"] > 0 and r["epochs"] == r["epochs_counted"] == 1
        assert r["load_seconds"] > 0
        assert ("native_bf16" in r) == (r["precision"] == "bf16")
    # Streamed or in memory, the same rows in the same batches give the same weights.
    for precision in ("fp32", "bf16"):
        losses = [r["final_loss"] for r in results if r["precision"] == precision]
        assert max(losses) - min(losses) < 1e-3, losses
    table = benchmark.markdown(report)
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(CELLS)
    assert "| in memory | – | fp32 |" in table and "| 1.00 |" in table


def test_cpu_flags_say_whether_bf16_is_native(benchmark: ModuleType) -> None:
    found = benchmark.native_bf16()
    assert set(found["bf16_flags"]) <= set(benchmark.BF16_FLAGS)
    assert found["native_bf16"] in (bool(found["bf16_flags"]), None)
