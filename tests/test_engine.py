"""Tests for serving.engine: every back end answers the reference loop's probabilities."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from helpers import batchnorm_mlp
from serving.architectures import create_model
from serving.bundle import load_bundle
from serving.engine import ENGINES, EngineSpec, create_engine, parse_engine
from serving.engine.auto import AutoEngine
from serving.engine.base import Engine, Origin
from serving.engine.fused import FusedEngine
from serving.engine.onnx import OnnxEngine
from serving.engine.reference import ReferenceEngine
from serving.engine.shortcut import ShortcutEngine, split_at_first_layer
from serving.manifest import InputSpec
from serving.predictor import Predictor
from serving.settings import AppConfig
from serving.simplex import mix_vertices, sample_dirichlet

if TYPE_CHECKING:
    from helpers import TinyBundle

MakeBundle = Callable[..., "TinyBundle"]
FP32_ENGINES = ["fused", "shortcut"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "engine.py"
MLP = functools.partial(create_model, "mlp", input_shape=(4,), num_outputs=3)


def _probs(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.float().softmax(dim=-1).cpu()


def _inputs(shape: Sequence[int] = (4,), batch: int = 7, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _predictors(
    tiny: TinyBundle, path: Path, engine: str, **kwargs: Any
) -> tuple[Predictor, Predictor]:
    bundle = load_bundle(tiny.write(path))
    return tuple(  # type: ignore[return-value]
        Predictor(bundle, allow_custom_architecture=tiny.custom, engine=name, **kwargs)
        for name in ("reference", engine)
    )


def bn_first(*, input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """BatchNorm before the first Linear: not linear in the mixed state, so no shortcut."""
    return nn.Sequential(nn.BatchNorm1d(input_shape[0]), nn.Linear(input_shape[0], num_outputs))


class Residual(nn.Module):
    """A network that is not an ``nn.Sequential``: no shortcut."""

    def __init__(self, width: int, num_outputs: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + torch.relu(self.inner(x)))


def _engines(
    build: Callable[[], nn.Module],
    input_shape: Sequence[int],
    engine: EngineSpec | str,
    *,
    num_vertices: Sequence[int] = (2, 3),
    draws: int = 4,
    **kwargs: Any,
) -> tuple[ReferenceEngine, Engine]:
    """(reference, engine) over the members of simplexes of independently initialised vertices
    (PyTorch's initialisation: realistic scales), each member with its own random buffers."""
    torch.manual_seed(0)
    model = build().eval()
    vertices = [
        [{n: p.detach() for n, p in build().named_parameters()} for _ in range(v)]
        for v in num_vertices
    ]
    members, origins = [], []
    for m, simplex in enumerate(vertices):
        for alpha in sample_dirichlet(len(simplex), draws, torch.Generator().manual_seed(m)):
            buffers = {
                n: b + torch.rand_like(b) if b.is_floating_point() else b
                for n, b in model.named_buffers()
            }
            members.append(mix_vertices(simplex, alpha) | buffers)
            origins.append(Origin(m, tuple(alpha.tolist())))
    spec = InputSpec(
        shape=tuple(input_shape), mean=(0.5,) * input_shape[0], std=(2.0,) * input_shape[0]
    )
    common = {"vertices": vertices, "origins": origins} | kwargs
    return ReferenceEngine(model, members, spec), create_engine(
        engine, model, members, spec, **common
    )


# --- configuration ----------------------------------------------------------------------------


def test_engine_strings_parse() -> None:
    assert parse_engine("reference") == EngineSpec("reference")
    assert parse_engine("fused:bf16,graphs") == EngineSpec("fused", "bf16", cuda_graphs=True)
    assert str(parse_engine("shortcut:graphs,fp16")) == "shortcut:fp16,graphs"
    assert parse_engine("fused:compile,graphs") == EngineSpec("fused", "fp32", True, True)
    assert str(parse_engine("fused:compile,bf16,graphs")) == "fused:bf16,graphs,compile"
    for bad, message in [
        ("turbo", "unknown engine 'turbo'"),
        ("reference:bf16", "engine 'reference' has no option 'bf16'"),
        ("fused:int8", "fused takes bf16, compile, fp16, graphs"),
        ("fused:bf16,fp16", "more than one precision"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_engine(bad)


def test_app_config_validates_the_engine() -> None:
    assert AppConfig(bundles=["b"]).engine == "auto"
    assert AppConfig(bundles=["b"], engine="fused:bf16").engine == "fused:bf16"
    with pytest.raises(ValueError, match="engine"):
        AppConfig(bundles=["b"], engine="fused:int8")


@pytest.mark.parametrize("name", ENGINES)
def test_every_engine_is_an_engine(name: str) -> None:
    if name == "onnx":
        pytest.importorskip("onnxruntime")
    reference, engine = _engines(MLP, (4,), name)
    classes = {
        "reference": ReferenceEngine,
        "fused": FusedEngine,
        "shortcut": ShortcutEngine,
        "onnx": OnnxEngine,
        "auto": AutoEngine,
    }
    assert type(engine) is classes[name]
    assert isinstance(engine, Engine) and isinstance(reference, Engine)
    assert not isinstance(reference.model, Engine)


def test_create_engine_takes_a_spec_or_its_string() -> None:
    for spec in (EngineSpec("fused", "bf16"), "fused:bf16"):
        _, engine = _engines(MLP, (4,), spec)
        assert type(engine) is FusedEngine and engine.dtype == torch.bfloat16  # type: ignore[attr-defined]


# --- every back end against the reference -----------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("engine", FP32_ENGINES)
def test_fp32_engines_equal_the_reference(
    tmp_path: Path, make_tiny_bundle: MakeBundle, engine: str, batchnorm: bool
) -> None:
    tiny = make_tiny_bundle(batchnorm=batchnorm, draws=5)
    reference, other = _predictors(tiny, tmp_path / "b", engine)
    x = _inputs()
    for draws in (None, 1, 3):
        expected = _probs(reference.outputs(x, draws))
        torch.testing.assert_close(_probs(other.outputs(x, draws)), expected, atol=1e-5, rtol=0)
    members = [7, 0, 3]  # any subset, in any order
    expected = _probs(reference.member_outputs(x, members))
    torch.testing.assert_close(
        _probs(other.member_outputs(x, members)), expected, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("engine", FP32_ENGINES)
def test_fresh_members_are_seen_after_a_first_run(
    tmp_path: Path, make_tiny_bundle: MakeBundle, engine: str
) -> None:
    reference, other = _predictors(make_tiny_bundle(), tmp_path / "b", engine, max_fresh_draws=6)
    x = _inputs()
    other.outputs(x)  # stacks the stored members
    for draws in (4, 8):  # fresh members added after construction, and after a first run
        expected = _probs(reference.outputs(x, draws))
        torch.testing.assert_close(_probs(other.outputs(x, draws)), expected, atol=1e-5, rtol=0)
    assert other.num_members == reference.num_members == 2 * 8


@pytest.mark.parametrize("engine", FP32_ENGINES)
def test_chunks_of_rows_and_members(engine: str) -> None:
    build = functools.partial(
        create_model, "cnn", input_shape=(2, 9), num_outputs=3, channels=(4, 5)
    )
    reference, other = _engines(build, (2, 9), engine, chunk_size=3)
    x = _inputs((2, 9), batch=8)  # chunks of 3, 3 and 2 rows; groups of 1 or 3 members
    torch.testing.assert_close(
        _probs(other.outputs(x)), _probs(reference.outputs(x)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("max_vmap_batch", [None, 0])
@pytest.mark.parametrize("engine", FP32_ENGINES)
def test_vmapped_and_member_by_member_runs_agree(engine: str, max_vmap_batch: int | None) -> None:
    build = functools.partial(batchnorm_mlp, input_shape=(4,), num_outputs=3)
    reference, other = _engines(build, (4,), engine, max_vmap_batch=max_vmap_batch)
    x = _inputs()
    torch.testing.assert_close(
        _probs(other.outputs(x)), _probs(reference.outputs(x)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("architecture", "kwargs", "expected"),
    [("mlp", {}, None), ("cnn", {"channels": (4, 5)}, 1)],
)
def test_on_the_cpu_only_convolutional_models_leave_vmap_past_one_row(
    architecture: str, kwargs: dict[str, Any], expected: int | None
) -> None:
    build = functools.partial(
        create_model, architecture, input_shape=(2, 9), num_outputs=3, **kwargs
    )
    _, fused = _engines(build, (2, 9), "fused")
    assert fused.max_vmap_batch == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("architecture", "shape"),
    [("mlp", (4,)), ("cnn", (2, 9)), ("cnn", (3, 6, 5))],
)
@pytest.mark.parametrize("engine", ["fused:bf16", "shortcut:bf16"])
def test_bf16_engines_are_within_2e_3(
    architecture: str, shape: tuple[int, ...], engine: str
) -> None:
    build = functools.partial(create_model, architecture, input_shape=shape, num_outputs=5)
    reference, other = _engines(build, shape, engine)
    x = _inputs(shape)
    error = (_probs(other.outputs(x)) - _probs(reference.outputs(x))).abs().max()
    assert error <= 2e-3


# --- the shortcut applies where it is exact, and only there ------------------------------------


@pytest.mark.parametrize(
    ("build", "shape", "applies"),
    [
        (functools.partial(create_model, "mlp", input_shape=(4,), num_outputs=3), (4,), True),
        (functools.partial(create_model, "cnn", input_shape=(2, 9), num_outputs=3), (2, 9), True),
        (
            functools.partial(create_model, "cnn", input_shape=(3, 6, 5), num_outputs=3),
            (3, 6, 5),
            True,
        ),
        (functools.partial(batchnorm_mlp, input_shape=(4,), num_outputs=3), (4,), True),
        (functools.partial(bn_first, input_shape=(4,), num_outputs=3), (4,), False),
        (functools.partial(Residual, 4, 3), (4,), False),
    ],
)
def test_shortcut_applies_only_where_exact(
    build: Callable[[], nn.Module], shape: tuple[int, ...], applies: bool
) -> None:
    assert (split_at_first_layer(build()) is not None) is applies
    reference, shortcut = _engines(build, shape, "shortcut")
    assert isinstance(shortcut, ShortcutEngine) and shortcut.applies is applies
    x = _inputs(shape)
    torch.testing.assert_close(
        _probs(shortcut.outputs(x)), _probs(reference.outputs(x)), atol=1e-5, rtol=0
    )


def test_shortcut_mixes_outputs_only_when_there_are_fewer_vertices_than_members() -> None:
    _, shortcut = _engines(MLP, (4,), "shortcut", num_vertices=(2,), draws=4)
    assert not isinstance(shortcut.prepare((0, 1, 2)), dict)  # 2 vertices for 3 members: mixed
    assert isinstance(shortcut.prepare((0, 1)), dict)  # 2 vertices for 2 members: stacked


def test_shortcut_without_origins_runs_fused() -> None:
    reference, shortcut = _engines(MLP, (4,), "shortcut", num_vertices=(2,), draws=4)
    index = shortcut.add(reference.members[0])  # a member of unknown origin
    reference.add(reference.members[0])
    assert isinstance(shortcut.prepare((0, 1, 2, index)), dict)
    x = _inputs()
    torch.testing.assert_close(
        _probs(shortcut.outputs(x)), _probs(reference.outputs(x)), atol=1e-5, rtol=0
    )


# --- ONNX Runtime -----------------------------------------------------------------------------


def test_onnx_graph_equals_the_reference_with_its_pooling(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from serving.predictive import classify

    tiny = make_tiny_bundle(batchnorm=True, num_vertices=(2, 2), draws=1)  # exports take seconds
    reference, onnx = _predictors(tiny, tmp_path / "b", "onnx")
    x = _inputs()
    expected = reference.outputs(x)
    torch.testing.assert_close(_probs(onnx.outputs(x)), _probs(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(  # the batch dimension is dynamic
        _probs(onnx.outputs(x[:1])), _probs(expected[:, :1]), atol=1e-5, rtol=0
    )
    graph = onnx.engine.run(x, temperature=1.5)  # type: ignore[attr-defined]
    pooled = classify(expected, temperature=1.5)
    for name in ("probs", "entropy", "expected_entropy", "mutual_information"):
        torch.testing.assert_close(graph[name], getattr(pooled, name), atol=1e-5, rtol=0)


def test_onnx_sessions_use_torchs_thread_count(
    tmp_path: Path, make_tiny_bundle: MakeBundle
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tiny = make_tiny_bundle(num_vertices=(2,), draws=1)
    _, onnx = _predictors(tiny, tmp_path / "b", "onnx")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # ONNX Runtime's default would be one thread per core
        options = onnx.engine.session([0]).get_session_options()  # type: ignore[attr-defined]
    finally:
        torch.set_num_threads(threads)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_onnx_on_cuda_without_a_cuda_provider_is_refused_not_run_on_the_cpu() -> None:
    from serving.engine.onnx import check_providers

    with pytest.raises(
        RuntimeError, match=r"needs onnxruntime-gpu; .* offers CPUExecutionProvider"
    ):
        check_providers(torch.device("cuda"), ["CPUExecutionProvider"])
    check_providers(torch.device("cuda"), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_providers(torch.device("cpu"), ["CPUExecutionProvider"])


# --- the benchmark ----------------------------------------------------------------------------


def test_quick_benchmark_writes_sane_json(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("engine_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "engine.json"
    benchmark.main(
        [
            "--quick",
            "--engines",
            "reference",
            "fused",
            "shortcut:bf16",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert len(report["loadavg_before"]) == 3 and report["matmul_peak_gflops"]["fp32"] > 0
    cells = report["results"]
    assert {(c["model"], c["engine"]) for c in cells} == {
        (model, engine)
        for model in ("cnn", "mlp")
        for engine in ("reference", "fused", "shortcut:bf16")
    }
    for cell in cells:
        assert cell["latency_ms"] > 0 and cell["gflops"] > 0 and cell["fraction_of_fp32_peak"] > 0
        tolerance = 2e-3 if parse_engine(cell["engine"]).precision == "bf16" else 1e-5
        assert cell["max_prob_error"] <= tolerance
    table = benchmark.markdown(report).splitlines()
    assert table[0].split(" | ")[4:6] == ["fused × loop (%)", "shortcut:bf16 × loop (%)"]
    rows = [line.strip("| ").split(" | ") for line in table[2:]]
    assert [row[:3] for row in rows] == [["cnn", "4", "2"], ["mlp", "4", "2"]]
    fused = next(c for c in cells if (c["model"], c["engine"]) == ("cnn", "fused"))
    assert rows[0][4].startswith(f"{fused['speedup_vs_reference']:.2f} (")


def test_graphs_and_compile_are_ignored_on_the_cpu() -> None:
    shape = (3, 8, 8)
    build = functools.partial(create_model, "cnn", input_shape=shape, num_outputs=5)
    reference, engine = _engines(build, shape, "fused:graphs,compile")
    assert not engine.cuda_graphs and not engine.torch_compile  # type: ignore[attr-defined]
    assert engine._run == engine.run  # type: ignore[attr-defined]  # nothing was compiled
    x = _inputs(shape, batch=3, seed=0)
    error = (_probs(engine.outputs(x)) - _probs(reference.outputs(x))).abs()
    assert error.max() <= 1e-5


def test_profile_of_a_cell_accounts_for_its_operators(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    command = [sys.executable, str(BENCHMARK.with_name("profile_engine.py")), "--calls", "2"]
    command += ["--members", "2", "--batch", "2", "--input-shape", "3", "8", "8", "--top", "3"]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert report["cell"] == {"device": "cpu", "model": "cnn", "members": 2, "batch": 2, "calls": 2}
    assert [e["engine"] for e in report["engines"]] == ["reference", "fused"]
    for engine in report["engines"]:
        assert engine["wall_ms_per_call"] > 0 and engine["op_ms_per_call"] > 0
        shares = [row["share"] for row in engine["top"]]
        assert len(shares) == 3 and shares == sorted(shares, reverse=True) and sum(shares) <= 1
    reference_ops = [row["name"] for row in report["engines"][0]["top"]]
    assert any("conv" in name for name in reference_ops), reference_ops


# --- CUDA (skipped without a GPU; benchmarks/gpu_engine.sh runs them) --------------------------


@CUDA
@pytest.mark.parametrize(
    ("engine", "tolerance"),
    [
        ("fused", 1e-5),
        ("shortcut", 1e-5),
        ("fused:graphs", 1e-5),
        ("shortcut:graphs", 1e-5),
        ("fused:fp16,graphs", 2e-3),
        ("fused:compile", 1e-5),
        ("fused:graphs,compile", 1e-5),
        ("shortcut:graphs,compile", 1e-5),
        ("fused:bf16", 2e-3),
        ("shortcut:fp16", 2e-3),
        ("onnx", 1e-5),
        ("auto", 1e-5),
    ],
)
def test_cuda_engines_equal_the_cpu_reference(engine: str, tolerance: float) -> None:
    if engine == "onnx":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDA provider")
    shape = (3, 8, 8)
    build = functools.partial(create_model, "cnn", input_shape=shape, num_outputs=5)
    reference, other = _engines(build, shape, engine, device="cuda")
    assert other.device.type == "cuda"
    cases = [(batch, members) for batch in (1, 3, 64, 65) for members in (None, [5, 0, 2, 7])]
    # graphs: padded to 1, 4, 64 (65 runs eagerly) and captured in this order; replaying them
    # in the reverse order checks that graphs sharing a memory pool do not clobber each other.
    for batch, members in cases + cases[::-1]:
        x = _inputs(shape, batch=batch, seed=batch)
        error = (_probs(other.outputs(x, members)) - _probs(reference.outputs(x, members))).abs()
        assert error.max() <= tolerance, (batch, members)


@CUDA
@pytest.mark.parametrize("engine", ["fused:graphs", "fused:graphs,compile"])
def test_graphs_are_captured_while_another_thread_synchronises_on_cuda(engine: str) -> None:
    shape = (3, 8, 8)
    build = functools.partial(create_model, "cnn", input_shape=shape, num_outputs=5)
    reference, graphs = _engines(build, shape, engine, device="cuda")
    stop, failures = threading.Event(), []

    def serve_another_bundle() -> None:  # a replica answering while a new bundle warms up
        a = torch.randn(256, 256, device="cuda")
        try:
            while not stop.is_set():
                a = (a @ a).tanh()
                a.sum().item()  # a synchronising call, as a request's answer makes
        except Exception as error:  # reported below
            failures.append(error)

    thread = threading.Thread(target=serve_another_bundle)
    thread.start()
    try:
        for batch in (1, 2, 4, 8, 16, 32, 64):  # each captures a new graph
            x = _inputs(shape, batch=batch, seed=batch)
            error = (_probs(graphs.outputs(x)) - _probs(reference.outputs(x))).abs()
            assert error.max() <= 1e-5, batch
    finally:
        stop.set()
        thread.join()
    assert not failures, failures


def test_importing_the_engines_imports_neither_ray_nor_onnxruntime() -> None:
    code = (
        "import sys, serving.engine, serving.engine.fused, serving.engine.shortcut, "
        "serving.engine.onnx, serving.engine.auto, serving.predictor, serving.settings\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('ray', 'onnxruntime')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
