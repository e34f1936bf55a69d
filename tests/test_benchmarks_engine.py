"""``benchmarks/engine.py`` on ResNet-18: members carry BatchNorm statistics of their own, and
the engines answer the reference's probabilities with them. (The toy models' smoke test is
``tests/test_engine.py::test_quick_benchmark_writes_sane_json``.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from helpers import FP32_ATOL, benchmark_module


@pytest.fixture(scope="module")
def benchmark() -> Iterator[ModuleType]:
    with benchmark_module("engine") as module:
        yield module


def test_resnet18_runs_on_request_with_fifteen_members(benchmark: ModuleType) -> None:
    args = benchmark.parse_args([])
    assert args.models == ["cnn", "mlp"]
    assert [list(benchmark.members_of(args, m)) for m in args.models] == [[1, 4, 16, 64]] * 2
    args = benchmark.parse_args(["--models", "resnet18", "--batches", "1", "8", "64"])
    assert list(benchmark.members_of(args, "resnet18")) == [15]
    args = benchmark.parse_args(["--models", "resnet18", "--members", "15", "--engines", "auto"])
    assert args.engines == ["reference", "auto"]


def test_members_have_their_own_batchnorm_statistics(benchmark: ModuleType) -> None:
    model, states, _, _ = benchmark.build_ensemble("resnet18", (3, 8, 8), 3)
    assert all(state.keys() == model.state_dict().keys() for state in states)
    first, second, _ = states
    for name in ("bn1.running_mean", "layer4.1.bn2.running_var"):
        assert not torch.equal(first[name], second[name])
    variances = torch.cat([s[n] for s in states for n in s if n.endswith("running_var")])
    assert variances.min() >= 1 and variances.max() <= 1.5
    assert torch.equal(first["bn1.num_batches_tracked"], model.bn1.num_batches_tracked)
    again = benchmark.build_ensemble("resnet18", (3, 8, 8), 2)[1]  # the same, for fewer members
    assert all(torch.equal(again[i][n], states[i][n]) for i in range(2) for n in again[i])
    _, toy_states, _, _ = benchmark.build_ensemble("cnn", (3, 8, 8), 2)
    assert all(not any(b in n for b in ("running", "tracked")) for n in toy_states[0])


def test_quick_resnet18_cells_match_the_reference(benchmark: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "resnet18.json"
    command = ["--quick", "--threads", "1", "--models", "resnet18", "--out", str(out)]
    engines = ["reference", "fused", "shortcut", "onnx", "auto"]
    threads = torch.get_num_threads()
    try:  # one thread: the smoke test stays seconds long on a machine busy with other work
        benchmark.main([*command, "--engines", *engines, "--onnx-max-members", "2"])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["members"] == {"resnet18": [4]}
    assert report["flops_per_member_instance"]["resnet18"] > 0
    cells = {c["engine"]: c for c in report["results"]}
    assert list(cells) == engines
    for name in ("onnx", "auto"):  # past --onnx-max-members: skipped, never exported
        assert "skipped" in cells[name]
    for name in ("reference", "fused", "shortcut"):
        cell = cells[name]
        assert cell["latency_ms"] > 0 and cell["gflops"] > 0
        assert cell["max_prob_error"] <= FP32_ATOL
    assert cells["shortcut"]["shortcut_applied"] is False  # not an nn.Sequential: runs fused
    assert "resnet18 | 4 | 2 |" in benchmark.markdown(report)
