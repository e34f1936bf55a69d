"""The experiments ``espro experiment`` knows, and how one is run and written out."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any

from training.experiments.report import Context, write_outputs

log = logging.getLogger(__name__)

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "ensembles": (
        "training.experiments.ensembles",
        "single, deep ensembles 1-5 and ESPRO 1-5 modes x order 1-3 on MNIST-1D and digits; "
        "error/NLL/ECE/Brier raw and temperature-scaled; error vs training time",
    ),
    "shift": (
        "training.experiments.shift",
        "accuracy, NLL and ECE vs corruption severity (noise, masking, translation, blur)",
    ),
    "spro-complex": (
        "training.experiments.spro_complex",
        "mode connecting simplicial complexes for 2 and 3 modes; loss planes, volumes",
    ),
    "dimensionality": (
        "training.experiments.dimensionality",
        "volume of a 2-mode connecting complex vs number of connecting vertices",
    ),
    "diversity": (
        "training.experiments.diversity",
        "a 3-simplex on two spirals: decision regions of draws and of their ensemble",
    ),
    "regression": (
        "training.experiments.regression",
        "1-D regression with three input clusters: mean and 2-sigma bands, test log-likelihood",
    ),
    "draws": (
        "training.experiments.draws",
        "test error and NLL vs number of draws per simplex",
    ),
}


def describe() -> str:
    """One line per experiment: its name and what it measures."""
    width = max(map(len, EXPERIMENTS))
    return "\n".join(f"{name.ljust(width)}  {text}" for name, (_, text) in EXPERIMENTS.items())


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    output: str | Path | None = None,
    seed: int = 0,
    command: str | None = None,
) -> tuple[Path, Path, dict[str, Any]]:
    """Run experiment ``name``; write ``report.md`` and ``results.json`` into ``output``."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    module = importlib.import_module(EXPERIMENTS[name][0])
    output = Path(output) if output is not None else Path("docs/reproduction") / name
    ctx = Context(name=name, quick=quick, output=output, seed=seed)
    command = command or f"espro experiment {name}" + (" --quick" if quick else "")
    start = time.perf_counter()
    results = module.run(ctx)
    seconds = time.perf_counter() - start
    report, json_path = write_outputs(ctx, module.TITLE, results, command, seconds)
    log.info("%s: %.1f s; wrote %s and %s", name, seconds, report, json_path)
    return report, json_path, results
