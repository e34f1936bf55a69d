"""Engine benchmark: latency, achieved GFLOP/s and its share of the machine's matmul peaks.

For the CNN on 3x32x32 inputs and the MLP on the same inputs flattened (and, on request,
ResNet-18 with the CIFAR stem: real size and BatchNorm), one 2-simplex (three vertices,
independently initialised) and K members drawn from it, every engine at every batch size: the
median latency of warm repeats, the model FLOPs done per second (the reference's FLOPs: S
member forward passes, counted by ``FlopCounterMode``; the shortcut skips some of them, so its
figure is the effective rate), that rate over the fp32 and bf16 ``torch.matmul`` peaks
measured in the same run, the speed-up over the reference loop and the largest probability
error against it. ::

    python benchmarks/engine.py                       # CPU, writes results/engine-cpu.json
    python benchmarks/engine.py --device cuda         # writes results/engine-cuda.json
    python benchmarks/engine.py --quick --out x.json  # a seconds-long smoke test
    python benchmarks/engine.py --markdown results/engine-cpu.json  # the docs' table

ResNet-18 (``--models resnet18``; not run by default) has BatchNorm, and ESPRO gives every
drawn member statistics of its own, so each member's state holds the model's buffers as well
as its parameters, with running statistics perturbed per member (:func:`member_buffers`).
Without ``--members`` it runs 15 members. Its cells, about 1.1 GFLOP per member and image,
beside the CNN's::

    python benchmarks/engine.py --threads 1 --models cnn resnet18 --members 15 \\
        --batches 1 8 64 --engines reference fused shortcut onnx auto \\
        --out benchmarks/results/engine-auto-cpu-amx.json

take about 7 minutes on one free core (``--threads 1``, as the recorded CPU runs) and up to
7 GB of memory: ``onnx`` and ``auto`` each export the 15 members to ONNX on first use (about
40 s each), batch 64 costs 7-13 s a call for every engine (four calls a cell), batches 1 and 8
under 1.5 s. Two threads halve the compute only on otherwise idle cores; beside other work they
are many times slower (threads waiting for each other at every operator). ``shortcut`` does
not apply to ResNet-18 (not an ``nn.Sequential``: it runs as ``fused``, and its column there
is ``fused`` measured again); ``--quick --models resnet18`` is the smoke test (4 members on
3x8x8 inputs).

A cell whose smaller-K sibling (same model, engine and batch) took longer than
``--max-call-s`` per call is skipped (recorded with ``"skipped"``), and so are ONNX and
``auto`` (which times ONNX among its candidates) past ``--onnx-max-members`` (the export takes
seconds per member): that bounds the run. A single K, such as ResNet-18's 15, has no smaller
sibling: every cell of it runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bundles import member_buffers
from torch.utils.flop_counter import FlopCounterMode

from serving.architectures import create_model
from serving.engine import create_engine, parse_engine
from serving.engine.auto import AutoEngine, onnx_available
from serving.engine.base import Engine, Origin
from serving.manifest import InputSpec
from serving.simplex import mix_vertices, sample_dirichlet

RESULTS = Path(__file__).parent / "results"
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn": ("cnn", {"channels": [32, 64], "hidden": 128}),
    "mlp": ("mlp", {"hidden": [256, 256]}),
    "resnet18": ("resnet18", {"small_input": True}),
}
DEFAULT_MODELS = ("cnn", "mlp")
"""The models run without ``--models``: ResNet-18 takes minutes and runs on request."""
DEFAULT_MEMBERS: dict[str, tuple[int, ...]] = {"resnet18": (15,)}
"""Members per model without ``--members`` (else :data:`TOY_MEMBERS`): ResNet-18's as asked
for, fifteen, which also keeps its cells to minutes on two CPU cores."""
TOY_MEMBERS = (1, 4, 16, 64)
CPU_ENGINES = ("reference", "fused", "shortcut", "fused:bf16", "shortcut:bf16", "onnx", "auto")
CUDA_ENGINES = (
    "reference",
    "fused",
    "shortcut",
    "fused:graphs",
    "fused:bf16",
    "fused:bf16,graphs",
    "fused:fp16",
    "fused:fp16,graphs",
    "shortcut:fp16,graphs",
    "onnx",
    "auto",
)
NUM_VERTICES = 3


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, repeats: int, min_seconds: float
) -> list[float]:
    """Seconds of ``repeats`` calls, more until ``min_seconds`` (at most 3 × ``repeats``)."""
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        synchronise(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 * repeats:
            break
    return times


def reset_memory_peak(device: torch.device) -> int:
    """Start a CUDA memory peak over; the bytes allocated now (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_peak(device: torch.device, before: int) -> dict[str, float]:
    """On CUDA, the most memory allocated since :func:`reset_memory_peak` beyond ``before``,
    in MiB: what a cell's first call and repeats added at their peak (stacked states, graphs,
    activations); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20}


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, min_seconds: float) -> float:
    """GFLOP/s of a square ``torch.matmul`` loop in ``dtype``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    seconds = statistics.median(time_call(lambda: a @ b, device, 3, min_seconds))
    return 2 * size**3 / seconds / 1e9


def build_ensemble(
    model_name: str, input_shape: Sequence[int], members: int, seed: int = 0
) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], list[Origin], list[list[Any]]]:
    """A model, ``members`` states drawn from one simplex of independently initialised
    vertices, their origins and the vertices (their parameters).

    A model with buffers (BatchNorm) gets them in every state too, as ESPRO recomputes each
    drawn member's statistics: see :func:`member_buffers`. A model without them (the toy
    ones) gets states of parameters only, drawn exactly as before."""
    architecture, kwargs = MODELS[model_name]
    torch.manual_seed(seed)
    build = functools.partial(
        create_model, architecture, input_shape=input_shape, num_outputs=10, **kwargs
    )
    vertices = [dict(build().named_parameters()) for _ in range(NUM_VERTICES)]
    vertices = [{k: v.detach() for k, v in vertex.items()} for vertex in vertices]
    alphas = sample_dirichlet(NUM_VERTICES, members, torch.Generator().manual_seed(seed))
    states = [mix_vertices(vertices, alpha) for alpha in alphas]
    origins = [Origin(0, tuple(alpha.tolist())) for alpha in alphas]
    model = build().eval()
    buffers = dict(model.named_buffers())
    if buffers:
        generator = torch.Generator().manual_seed(seed + 1)  # the global stream is untouched
        states = [state | member_buffers(buffers, generator) for state in states]
    return model, states, origins, [vertices]


def forward_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one member's forward pass on one instance (matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        info["cpus"] = fields.get("CPU(s)", "").strip()
        flags = fields.get("Flags", "").split()
        info["bf16_hardware"] = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16")))
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    input_shape = tuple(args.input_shape)
    load_before = os.getloadavg()
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 1024)
    bf16_size = peak_size if device.type == "cuda" else peak_size // 2
    peaks = {
        "fp32": matmul_peak(torch.float32, device, peak_size, args.min_seconds),
        "bf16": matmul_peak(torch.bfloat16, device, bf16_size, args.min_seconds),
    }
    if device.type == "cuda":
        peaks["fp16"] = matmul_peak(torch.float16, device, peak_size, args.min_seconds)
    results = []
    too_slow: set[tuple[str, str, int]] = set()
    spec = InputSpec(shape=input_shape, mean=(0.0,) * input_shape[0], std=(1.0,) * input_shape[0])
    flops_per_member_instance: dict[str, int] = {}
    for model_name in args.models:
        for k in sorted(members_of(args, model_name)):
            model, states, origins, vertices = build_ensemble(model_name, input_shape, k)
            flops = flops_per_member_instance[model_name] = forward_flops(model, input_shape)
            engines, build_ms = {}, {}
            for name in args.engines:  # auto times the others here: its build is its choice
                if exports_onnx(name) and k > args.onnx_max_members:
                    continue  # skipped below, unbuilt: auto would export every member too
                start = time.perf_counter()
                engines[name] = create_engine(
                    name, model, states, spec, device=device, vertices=vertices, origins=origins
                )
                build_ms[name] = (time.perf_counter() - start) * 1e3
            for batch in args.batches:
                x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(1))
                reference: tuple[str, torch.Tensor] | None = None  # the first fp32 engine run
                reference_seconds: float | None = None
                for name in args.engines:
                    cell = {"model": model_name, "engine": name, "members": k, "batch": batch}
                    if (model_name, name, batch) in too_slow or name not in engines:
                        results.append(cell | {"skipped": "too slow for this run's bounds"})
                        continue
                    engine = engines[name]
                    memory_before = reset_memory_peak(device)
                    start = time.perf_counter()  # the first call warms up: stacking, export, ...
                    probs = engine.outputs(x).float().softmax(-1).cpu()
                    first_call = time.perf_counter() - start
                    seconds = statistics.median(
                        time_call(
                            functools.partial(engine.outputs, x),
                            device,
                            args.repeats,
                            args.min_seconds / 2,
                        )
                    )
                    if seconds > args.max_call_s:
                        too_slow.add((model_name, name, batch))
                    if name == "reference":
                        reference_seconds = seconds
                    if reference is None and parse_engine(name).precision == "fp32":
                        reference = name, probs
                    gflops = k * batch * flops / seconds / 1e9
                    results.append(
                        cell
                        | {
                            "latency_ms": seconds * 1e3,
                            "first_call_ms": first_call * 1e3,
                            "gflops": gflops,
                            "fraction_of_fp32_peak": gflops / peaks["fp32"],
                            "fraction_of_bf16_peak": gflops / peaks["bf16"],
                            "speedup_vs_reference": reference_seconds / seconds
                            if reference_seconds
                            else None,
                            "max_prob_error": (probs - reference[1]).abs().max().item()
                            if reference
                            else None,
                            "error_against": reference[0] if reference else None,
                            "shortcut_applied": _shortcut_applied(engine, k),
                            "build_ms": build_ms[name],
                        }
                        | _auto_choice(engine)
                        | memory_peak(device, memory_before)
                    )
                    print(_row(results[-1]), file=sys.stderr, flush=True)
            del engines
    return {
        "command": args.command,
        "commit": commit(),
        "device": str(device),
        "machine": machine(device),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "input_shape": input_shape,
        "models": {name: MODELS[name] for name in args.models},
        "members": {name: sorted(members_of(args, name)) for name in args.models},
        "flops_per_member_instance": flops_per_member_instance,
        "matmul_peak_gflops": peaks,
        "results": results,
        "targets": targets(results),
    }


def commit() -> str:
    """The checkout's commit, for the report."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip()


def members_of(args: argparse.Namespace, model_name: str) -> Sequence[int]:
    """The member counts run for a model: ``--members``, else the model's default."""
    return args.members or DEFAULT_MEMBERS.get(model_name, TOY_MEMBERS)


def exports_onnx(engine: str) -> bool:
    """Whether building or first calling ``engine`` exports the members to ONNX (``onnx``, and
    ``auto`` where ONNX Runtime is installed: it times ``onnx`` among its candidates)."""
    name = parse_engine(engine).name
    return name == "onnx" or (name == "auto" and onnx_available())


def _shortcut_applied(engine: Engine, members: int) -> bool | None:
    applies = getattr(engine, "applies", None)
    return None if applies is None else bool(applies and members > NUM_VERTICES)


def _auto_choice(engine: Engine) -> dict[str, Any]:
    if not isinstance(engine, AutoEngine):
        return {}
    return {"auto_choice": engine.choice, "auto_timed_s": engine.spent_s}


def _row(cell: dict[str, Any]) -> str:
    return (
        f"{cell['model']:8} {cell['engine']:22} K={cell['members']:<3} B={cell['batch']:<3} "
        f"{cell['latency_ms']:9.2f} ms {cell['gflops']:8.2f} GFLOP/s "
        f"x{cell['speedup_vs_reference'] or math.nan:.2f} err {cell['max_prob_error']:.1e}"
        + (f" {cell['peak_memory_mib']:8.1f} MiB" if "peak_memory_mib" in cell else "")
    )


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The three speed targets, evaluated on the CNN with 16 members where measured."""

    def cell(engine: str, batch: int) -> dict[str, Any] | None:
        for c in results:
            if (c["model"], c["engine"], c["members"], c["batch"]) == ("cnn", engine, 16, batch):
                return c if "latency_ms" in c else None
        return None

    def best(batch: int, precision: str) -> dict[str, Any] | None:
        cells = [
            c
            for c in results
            if (c["model"], c["members"], c["batch"]) == ("cnn", 16, batch)
            and "latency_ms" in c
            and parse_engine(c["engine"]).precision == precision
        ]
        return min(cells, key=lambda c: c["latency_ms"]) if cells else None

    fp32, loop1, fused1 = best(64, "fp32"), cell("reference", 1), cell("fused", 1)
    bf16, loop64 = best(64, "bf16"), cell("reference", 64)
    unmeasured = {"met": None, "reason": "a cell it needs was skipped or not run"}
    out: dict[str, Any] = {}
    out["fp32_b64_at_least_60pct_of_peak"] = (
        {
            "engine": fp32["engine"],
            "fraction": fp32["fraction_of_fp32_peak"],
            "met": fp32["fraction_of_fp32_peak"] >= 0.6,
        }
        if fp32
        else unmeasured
    )
    out["b1_fused_at_least_2x_loop"] = (
        {
            "speedup": (ratio := loop1["latency_ms"] / fused1["latency_ms"]),
            "met": ratio >= 2,
        }
        if loop1 and fused1
        else unmeasured
    )
    out["bf16_b64_at_least_3x_fp32_loop"] = (
        {
            "engine": bf16["engine"],
            "speedup": (ratio := loop64["latency_ms"] / bf16["latency_ms"]),
            "max_prob_error": bf16["max_prob_error"],
            "met": ratio >= 3 and bf16["max_prob_error"] <= 2e-3,
        }
        if bf16 and loop64
        else unmeasured
    )
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as the Markdown table of docs/performance.md: per (model, K, batch) the
    loop's latency, then each engine's speed-up over it with, in brackets, its GFLOP/s as a
    percentage of the matmul peak of its precision (fp32, or bf16/fp16 where measured)."""
    peaks = report["matmul_peak_gflops"]
    cells = report["results"]
    engines = list(dict.fromkeys(c["engine"] for c in cells if c["engine"] != "reference"))
    reduced = [e for e in engines if parse_engine(e).precision != "fp32"]
    by_key = {(c["model"], c["members"], c["batch"], c["engine"]): c for c in cells}

    def percent(cell: dict[str, Any]) -> float:
        precision = parse_engine(cell["engine"]).precision
        return 100 * cell["gflops"] / peaks.get(precision, peaks["fp32"])

    def entry(cell: dict[str, Any] | None) -> str:
        if cell is None or "latency_ms" not in cell:
            return "skipped"
        return f"{cell['speedup_vs_reference']:.2f} ({percent(cell):.0f})"

    def worst_error(key: tuple[Any, ...]) -> str:
        errors = [
            by_key[(*key, e)]["max_prob_error"]
            for e in reduced
            if "latency_ms" in by_key.get((*key, e), {})
        ]
        return f"{max(errors):.1e}" if errors else "–"

    header = ["model", "K", "batch", "loop ms (% fp32 peak)"]
    header += [f"{e} × loop (%)" for e in engines]
    header += ["reduced-precision error"] if reduced else []
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    keys = dict.fromkeys((c["model"], c["members"], c["batch"]) for c in cells)
    for key in keys:
        loop = by_key.get((*key, "reference"))
        if loop is None or "latency_ms" not in loop:
            continue
        row = [str(k) for k in key] + [f"{loop['latency_ms']:.1f} ({percent(loop):.0f})"]
        row += [entry(by_key.get((*key, e))) for e in engines]
        row += [worst_error(key)] if reduced else []
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def onnx_runs_on(device: torch.device) -> bool:
    """Whether the installed ONNX Runtime runs the ``onnx`` engine on ``device``; says why not."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: the onnx engine is left out", file=sys.stderr)
        return False
    from serving.engine.onnx import check_providers

    try:
        check_providers(device, onnxruntime.get_available_providers())
    except RuntimeError as error:
        print(f"{error} The onnx engine is left out.", file=sys.stderr)
        return False
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--engines", nargs="+", help="engine strings (default: per device)")
    parser.add_argument(
        "--members", nargs="+", type=int, help="default: 15 for resnet18, else 1 4 16 64"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--input-shape", nargs="+", type=int, default=[3, 32, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per peak; half per cell")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-size", type=int, help="matmul side (default 1024 CPU, 8192 GPU)")
    parser.add_argument("--max-call-s", type=float, default=2.0)
    parser.add_argument(
        "--onnx-max-members", type=int, default=16, help="for onnx and auto: export takes long"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default results/engine-DEVICE.json)")
    parser.add_argument(
        "--markdown", type=Path, help="print the table of a report JSON for the docs, and stop"
    )
    args = parser.parse_args(argv)
    args.command = " ".join(
        ["python benchmarks/engine.py", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.engines is None:
        engines = CUDA_ENGINES if args.device.startswith("cuda") else CPU_ENGINES
        onnx = not args.quick and onnx_runs_on(torch.device(args.device))
        args.engines = [e for e in engines if onnx or not e.startswith("onnx")]
    args.engines = list(dict.fromkeys(["reference", *args.engines]))  # once each
    if args.quick:
        args.members, args.batches, args.input_shape = [4], [2], [3, 8, 8]
        args.repeats, args.min_seconds, args.peak_size = 1, 0.0, args.peak_size or 64
    if args.out is None:
        args.out = RESULTS / f"engine-{torch.device(args.device).type}.json"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.markdown is not None:
        report = json.loads(args.markdown.read_text())
        print(markdown(report))
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["targets"], indent=1))
    return report


if __name__ == "__main__":
    main()
