"""Request decoding in-process: time and peak memory of hostile and valid JSON bodies.

Each body goes through ``InferenceService.native_job`` or ``rest_job`` as a replica decodes it;
peak memory is what ``tracemalloc`` traces during the call (Python objects and numpy arrays),
as a multiple of the body. The baseline, measured in the same run, is a decoder with a Python
object per element: pydantic's JSON parser building lists, then ``np.asarray``. It takes the
native hostile bodies too, and the valid 16-image body is timed with both, call by call.

    .venv/bin/python benchmarks/request_decode.py --out benchmarks/results/request-decode.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundles import simplex_bundle
from engine import machine
from pydantic import BaseModel

from serving.errors import ServiceError
from serving.predictor import Predictor
from serving.service import InferenceService, ModelRepository

MiB = 1 << 20


class ListRequest(BaseModel):
    """The baseline: inputs as nested Python lists."""

    inputs: list[Any]


def nested(size: int, unit: bytes, head: bytes, tail: bytes) -> bytes:
    """``head`` + ``unit`` repeated to about ``size`` bytes, comma-separated, + ``tail``."""
    count = (size - len(head) - len(tail)) // (len(unit) + 1)
    return head + b",".join([unit] * count) + tail


def measure(call: Callable[[bytes], Any], body: bytes) -> dict[str, Any]:
    """Seconds and traced peak memory of one call, and what it answered."""
    start = time.perf_counter()
    try:
        call(body)
        outcome = "accepted"
    except ServiceError as err:
        outcome = f"{err.status}: {err.message[:80]}"
    seconds = time.perf_counter() - start
    tracemalloc.start()
    with contextlib.suppress(ServiceError):
        call(body)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "body_bytes": len(body),
        "seconds": seconds,
        "peak_bytes": peak,
        "peak_x_body": peak / len(body),
        "outcome": outcome,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp())
    shapes = {"vector": (4,), "image": (3, 32, 32)}
    service = InferenceService(
        ModelRepository(
            [
                Predictor.from_path(
                    simplex_bundle(
                        root / name,
                        name=name,
                        architecture="mlp",
                        kwargs={"hidden": [8]},
                        input_shape=shape,
                        num_outputs=10,
                        simplexes=1,
                        vertices=2,
                        draws=1,
                    )
                )
                for name, shape in shapes.items()
            ]
        )
    )

    def native(body: bytes) -> Any:
        return service.native_job("vector", body)

    def rest(body: bytes) -> Any:
        return service.rest_job("vector", None, body, None)

    def baseline(body: bytes) -> np.ndarray:
        return np.asarray(ListRequest.model_validate_json(body).inputs, np.float32)

    rest_head = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ['
    hostile = []
    for size in args.sizes_mib:
        for unit in (b"[]", b"[[]]", b"[[[[]]]]"):
            body = nested(size * MiB, unit, b'{"inputs": [', b"]}")
            row = {"door": "native", "body": f"{unit.decode()},..."}
            hostile.append(row | measure(native, body))
            hostile.append(row | {"door": "baseline"} | measure(baseline, body))
        for unit in (b"[]", b"[[]]"):
            body = nested(size * MiB, unit, rest_head, b"]}]}")
            hostile.append({"door": "rest", "body": f"{unit.decode()},..."} | measure(rest, body))

    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, *shapes["image"])).astype(np.float32)
    image_body = json.dumps({"inputs": images.tolist()}).encode()
    rows = json.dumps({"inputs": rng.standard_normal((200_000, 4)).astype(np.float32).tolist()})
    valid = [
        {"body": "16 images 3x32x32"}
        | measure(lambda b: service.native_job("image", b), image_body),
        {"body": "200000 rows x 4"} | measure(native, rows.encode()),
    ]

    def decoded(body: bytes) -> np.ndarray:
        return service.native_job("image", body).inputs.numpy()

    assert np.array_equal(baseline(image_body), decoded(image_body))
    times: dict[str, list[float]] = {"espro": [], "baseline": []}
    for _ in range(args.repeats):
        for name, call in (("espro", decoded), ("baseline", baseline)):
            start = time.perf_counter()
            call(image_body)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "command": args.command,
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": machine(torch.device("cpu")),
        "hostile": hostile,
        "valid": valid,
        "image_decode": {
            "body_bytes": len(image_body),
            "repeats": args.repeats,
            "median_seconds": medians,
            "espro_x_baseline": medians["espro"] / medians["baseline"],
        },
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 24])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per decoder")
    parser.add_argument("--out", type=Path, help="write the report JSON here")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join([".venv/bin/python benchmarks/request_decode.py", *given])
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    for row in report["hostile"] + report["valid"]:
        print(
            f"{row.get('door', 'native'):6} {row['body']:18} {row['body_bytes'] / MiB:6.1f} MiB "
            f"{row['seconds'] * 1e3:8.1f} ms  peak {row['peak_x_body']:5.2f}x  {row['outcome']}"
        )
    image = report["image_decode"]
    print(
        f"16-image decode: espro {image['median_seconds']['espro'] * 1e3:.2f} ms, baseline "
        f"{image['median_seconds']['baseline'] * 1e3:.2f} ms ({image['espro_x_baseline']:.2f}x)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
