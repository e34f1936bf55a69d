"""Cold start: seconds from launching ``espro serve`` to its first ready answer, where that time
goes (from the timestamps of Ray's and Serve's logs), and the memory of every process it runs
(driver, GCS, raylet, Serve controller, proxy, replicas).

Run it where Ray may open ports, i.e. in a loopback-only network namespace:

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/cold_start.py \\
        runs/demo/bundle --out benchmarks/results/cold-start.json'

``--join`` starts a Ray head first (``ray start``, as KubeRay does) and launches ``espro serve
--address`` against it: the time to an answer when Ray is already up. Memory is then the
driver's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from soak import memory

from serving.bundle import load_bundle


def first_answer(url: str, body: bytes, deadline: float) -> float:
    """Poll ``url`` with ``body`` until it answers 200; the time it did."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status == 200:
                    return time.perf_counter()
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no answer from {url} before the deadline")


RAY_LOGS = Path("/tmp/ray/session_latest/logs")
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
MILESTONES = {  # what happened: (log files, the first line that says so)
    "GCS up": ("gcs_server.out", ""),
    "raylet up": ("raylet.out", ""),
    "driver joined Ray (ray.init returns)": ("python-core-driver-*.log", ""),
    "Serve controller starting": ("serve/controller_*.log", "Controller starting"),
    "replica requested (serve.run)": ("serve/controller_*.log", "Starting Replica"),
    "replica process up, espro imported": ("serve/replica_*.log", "Started initializing"),
    "bundles loaded and warmed up": ("serve/replica_*.log", "serving "),
}
"""The milestones of a launch, each from the first log line (or the first matching line) of
the file that records it, in seconds after the launch."""


def first_stamp(file: Path, text: str, since: float) -> float | None:
    """The time (``time.time()`` scale) of the first line of ``file`` that holds ``text``, if
    it was written at ``since`` or later: a file of an earlier launch, or of a Ray that was
    already running, does not count."""
    with file.open(errors="replace") as lines:
        for line in lines:
            if text in line and (stamp := STAMP.search(line)):
                when = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return when if when >= since else None
    return None


def milestones(launched: float) -> dict[str, float | None]:
    """Seconds from ``launched`` (a ``time.time()``) to each of :data:`MILESTONES` in the newest
    Ray session's logs; ``None`` for one not found (Ray's own start, when joining a cluster)."""
    found: dict[str, float | None] = {}
    for name, (pattern, text) in MILESTONES.items():
        stamps = [first_stamp(f, text, launched) for f in sorted(RAY_LOGS.glob(pattern))]
        when = min((t for t in stamps if t is not None), default=None)
        found[name] = None if when is None else round(when - launched, 2)
    return found


def cold_start(bundle: Path, port: int, address: str | None = None) -> dict[str, Any]:
    """One launch (joining the Ray at ``address``, if given): time to the first prediction,
    memory while idle, time to stop."""
    manifest = load_bundle(bundle).manifest
    body = json.dumps({"inputs": [np.zeros(manifest.input.shape).tolist()]}).encode()
    url = f"http://127.0.0.1:{port}/v1/models/{manifest.name}/predict"
    command = [sys.executable, "-m", "serving.cli", "serve", str(bundle)]
    command += ["--http-port", str(port), "--grpc-port", str(port + 1000)]
    command += ["--address", address] if address else []
    start, launched = time.perf_counter(), time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = first_answer(url, body, time.monotonic() + 300)
        resident = memory(process.pid)
        phases = milestones(launched)
    finally:
        stopping = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    return {
        "seconds_to_first_answer": round(ready - start, 2),
        "seconds_to_milestones": phases,
        "seconds_to_stop": round(time.perf_counter() - stopping, 2),
        "exit_code": code,
        **resident,
    }


@contextlib.contextmanager
def ray_head(port: int) -> Iterator[str]:
    """A local Ray head on loopback, started as ``ray start`` starts one; its address."""
    ray = [str(Path(sys.executable).with_name("ray"))]
    start = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}"]
    subprocess.run([*ray, *start, "--include-dashboard=false"], check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*ray, "stop"], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--join", action="store_true", help="start Ray first; espro joins it")
    parser.add_argument("--ray-port", type=int, default=6390, help="the joined head's GCS port")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cold-start.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with ray_head(args.ray_port) if args.join else contextlib.nullcontext() as address:
        runs = [cold_start(args.bundle, args.port, address) for _ in range(args.repeats)]
    result = {
        "command": "benchmarks/cold_start.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
