"""Where one engine benchmark cell's time goes: wall time per call, the time the device (or the
CPU) spent in operators, and the operators that took most of it, from ``torch.profiler``.

Same models and ensembles as ``benchmarks/engine.py``. ::

    python benchmarks/profile_engine.py --device cuda --engines fused fused:graphs
    python benchmarks/profile_engine.py --members 16 --batch 1 --out /tmp/profile.json

On CUDA, ``busy`` is the summed self time of every kernel per call over the wall time per call:
well below 1 means the GPU waits for the CPU to issue work; near 1, the kernels themselves
(the top rows) bound the call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from engine import MODELS, build_ensemble, forward_flops, synchronise
from torch.profiler import ProfilerActivity, profile

from serving.engine import create_engine
from serving.manifest import InputSpec


def profile_engine(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Profile ``args.calls`` warm calls of engine ``name`` on one cell."""
    device = torch.device(args.device)
    input_shape = tuple(args.input_shape)
    model, states, origins, vertices = build_ensemble(args.model, input_shape, args.members)
    flops = forward_flops(model, input_shape) * args.members * args.batch  # the engine moves it
    spec = InputSpec(shape=input_shape, mean=(0.0,) * input_shape[0], std=(1.0,) * input_shape[0])
    engine = create_engine(
        name, model, states, spec, device=device, vertices=vertices, origins=origins
    )
    x = torch.randn(args.batch, *input_shape, generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # warm up: stacking, cuDNN autotuning, graph capture
        engine.outputs(x)
    synchronise(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(args.calls):
            start = time.perf_counter()
            engine.outputs(x)
            synchronise(device)
            walls.append(time.perf_counter() - start)
    wall_ms = statistics.median(walls) * 1e3
    events = [e for e in prof.key_averages() if e.count > 0]
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in events if getattr(e, attribute) > 0]
    if cuda:  # kernels and copies only: CPU-side operators also report device time
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(getattr(e, attribute) for e in events)
    top = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[: args.top]
    report = {
        "engine": name,
        "wall_ms_per_call": wall_ms,
        "gflops": flops / wall_ms / 1e6,
        "op_ms_per_call": total_us / args.calls / 1e3,
        "busy": total_us / args.calls / 1e3 / wall_ms,
        "top": [
            {
                "name": e.key,
                "calls_per_call": e.count / args.calls,
                "ms_per_call": getattr(e, attribute) / args.calls / 1e3,
                "share": getattr(e, attribute) / total_us,
            }
            for e in top
        ],
    }
    print(
        f"{name}: {wall_ms:.3f} ms per call, {report['gflops']:.0f} GFLOP/s, "
        f"{'kernels' if cuda else 'operators'} {report['op_ms_per_call']:.3f} ms "
        f"(busy {report['busy']:.2f})"
    )
    for row in report["top"]:
        print(
            f"  {row['ms_per_call']:8.3f} ms {100 * row['share']:5.1f} % "
            f"x{row['calls_per_call']:<5g} {row['name'][:110]}"
        )
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="cnn", choices=list(MODELS))
    parser.add_argument("--engines", nargs="+", default=["reference", "fused"])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-shape", nargs="+", type=int, default=[3, 32, 32])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=10, help="operators listed per engine")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reports = [profile_engine(args, name) for name in args.engines]
    if args.out is not None:
        cell = {k: getattr(args, k) for k in ("device", "model", "members", "batch", "calls")}
        args.out.write_text(json.dumps({"cell": cell, "engines": reports}, indent=1) + "\n")
    return reports


if __name__ == "__main__":
    main()
