"""What every experiment shares: its context, figures, tables, timing and machine info."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Context:
    """One run of one experiment: its size, output folder, seed and the report being built."""

    name: str
    quick: bool
    output: Path
    seed: int = 0
    sections: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def size(self, quick: Any, full: Any) -> Any:
        """``quick`` for a ``--quick`` run, ``full`` otherwise."""
        return quick if self.quick else full

    def add(self, markdown: str) -> None:
        """Append a block of Markdown to the report."""
        self.sections.append(markdown.strip() + "\n")

    def figure(self, fig: Any, name: str, caption: str) -> str:
        """Save ``fig`` as ``NAME.png`` next to the report, close it, and embed it."""
        plt = pyplot()
        self.output.mkdir(parents=True, exist_ok=True)
        filename = f"{name}.png"
        fig.savefig(self.output / filename, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.figures.append(filename)
        self.add(f"![{caption}]({filename})\n\n*{caption}*")
        return filename

    @contextmanager
    def timed(self, label: str) -> Iterator[None]:
        """Record the wall time of a block under ``label``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - start


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A Markdown table; floats are printed with ``digits`` decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the run happened: enough to compare wall times."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_cores_available": cores,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def jsonable(value: Any) -> Any:
    """JSON-safe: tensors and numpy scalars to floats, non-finite floats to strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_outputs(
    ctx: Context, title: str, results: dict[str, Any], command: str, seconds: float
) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` into ``ctx.output``; return both paths."""
    ctx.output.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    payload = {
        "experiment": ctx.name,
        "quick": ctx.quick,
        "seed": ctx.seed,
        "command": command,
        "wall_seconds": seconds,
        "timings": ctx.timings,
        "machine": machine,
        "figures": ctx.figures,
        "results": results,
    }
    json_path = ctx.output / "results.json"
    json_path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    size = "quick (`--quick`, a smoke test: not evidence)" if ctx.quick else "full"
    header = (
        f"# {title}\n\n"
        f"Command: `{command}`  \n"
        f"Size: {size}; seed {ctx.seed}; wall time {seconds:.1f} s on "
        f"{machine['cpu_cores_available']} CPU core(s) ({machine['platform']}, torch "
        f"{machine['torch']}).  \n"
        "Raw numbers: [results.json](results.json). Every number below was measured by this "
        "run.\n"
    )
    report_path = ctx.output / "report.md"
    report_path.write_text(header + "\n" + "\n".join(ctx.sections))
    return report_path, json_path
