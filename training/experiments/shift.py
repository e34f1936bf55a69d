"""Robustness to dataset shift: single model, deep ensemble and ESPRO under corruptions.

Temperatures are fitted on the clean validation split, checked on the clean calibration split
(as deployed) and then held fixed.
"""

from __future__ import annotations

import logging
from typing import Any

from training.corruptions import CORRUPTIONS
from training.espro import generator
from training.evaluation import fit_checked_scale, score
from training.experiments.common import (
    SCALE_FIT,
    SCALE_FIT_UNCHECKED,
    draw,
    make_config,
    member_outputs,
    mode_states,
    setup,
    train_simplexes,
)
from training.experiments.report import Context, pyplot, table

TITLE = "Dataset shift: accuracy, NLL and ECE against corruption severity (MNIST-1D)"
KEYS = ("accuracy", "nll", "ece")

log = logging.getLogger(__name__)


def run(ctx: Context) -> dict[str, Any]:
    config = make_config(
        dataset="mnist1d",
        architecture="cnn",
        kwargs={"channels": [32, 64], "hidden": 128},
        data_options={"n_samples": 600} if ctx.quick else {},
        per_simplex=ctx.size(2, 5),
        seed=ctx.seed,
        **ctx.size(
            {
                "modes": 2,
                "mode_epochs": 4,
                "vertices": 1,
                "vertex_epochs": 1,
                "samples": 2,
                "batch_size": 32,
            },
            {"modes": 3, "mode_epochs": 30, "vertices": 2, "vertex_epochs": 6},
        ),
    )
    s = setup(config)
    with ctx.timed("training"):
        simplexes = train_simplexes(s)
    modes = mode_states(simplexes)
    drawn = [
        m
        for i, sm in enumerate(simplexes)
        for m in draw(s, sm.vertices, sm.buffers, config.draws.per_simplex, ctx.seed, i)[0]
    ]
    members = modes + drawn
    methods = {
        "single": [0],
        "deep_ensemble": list(range(len(modes))),
        "espro": list(range(len(modes), len(members))),
    }
    data = s.dataset
    val = member_outputs(s, members, data.val.x)
    check = member_outputs(s, members, data.calibration.x)
    fits = {
        m: fit_checked_scale(s.task, val[i], data.val.y, check[i], data.calibration.y)
        for m, i in methods.items()
    }
    for m, (_, warning) in fits.items():
        if warning:
            log.warning("shift %s: %s", m, warning)
    scales = {m: scale for m, (scale, _) in fits.items()}
    results: dict[str, Any] = {
        "config": config.model_dump(mode="json", by_alias=True),
        "scale_fit": SCALE_FIT,
        "temperature": scales,
        "temperature_warnings": {m: warning for m, (_, warning) in fits.items()},
        "members": {m: len(i) for m, i in methods.items()},
        "corruptions": {},
    }
    with ctx.timed("evaluation"):
        for name, (corrupt, full, quick, unit) in CORRUPTIONS.items():
            rng = generator(ctx.seed, "shift", name)
            per_severity = {}
            for severity in ctx.size(quick, full):
                x = corrupt(data.test.x, severity, s.input_spec, rng)
                out = member_outputs(s, members, x)
                per_severity[str(severity)] = {
                    m: score(s.task, out[i], data.test.y, scales[m]) for m, i in methods.items()
                }
            results["corruptions"][name] = {"unit": unit, "severities": per_severity}
    _report(ctx, results)
    return results


def _report(ctx: Context, results: dict[str, Any]) -> None:
    plt = pyplot()
    names = list(results["corruptions"])
    methods = list(results["members"])
    fig, axes = plt.subplots(len(KEYS), len(names), figsize=(4 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        entry = results["corruptions"][name]
        severities = list(entry["severities"])
        for row, key in enumerate(KEYS):
            ax = axes[row][col]
            for method in methods:
                ax.plot(
                    [float(v) for v in severities],
                    [entry["severities"][v][method][key] for v in severities],
                    marker="o",
                    label=method,
                )
            ax.set_xlabel(entry["unit"])
            ax.set_ylabel(key)
            if row == 0:
                ax.set_title(name)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fit = results.get("scale_fit", SCALE_FIT_UNCHECKED)
    warnings = {m: w for m, w in results.get("temperature_warnings", {}).items() if w}
    ctx.add(
        "Single = mode 0; deep ensemble = the modes; ESPRO = draws from a simplex grown at each "
        f"mode (members: {results['members']}). Temperatures (clean data; {fit}): "
        + ", ".join(f"{m} {t:.3f}" for m, t in results["temperature"].items())
        + ". All scores temperature-scaled."
        + "".join(f" Temperature warning, {m}: {w}." for m, w in warnings.items())
    )
    ctx.figure(fig, "shift", "Accuracy, NLL and ECE against severity, per corruption.")
    wins = {m: 0 for m in methods}
    losses = {m: 0 for m in methods}
    total = 0
    for name in names:
        entry = results["corruptions"][name]
        rows = []
        for severity, by_method in entry["severities"].items():
            rows.append([severity, *[by_method[m][k] for k in KEYS for m in methods]])
            if float(severity) > 0:
                total += 1
                wins[min(methods, key=lambda m: by_method[m]["nll"])] += 1
                losses[max(methods, key=lambda m: by_method[m]["nll"])] += 1
        header = ["severity", *[f"{k} {m}" for k in KEYS for m in methods]]
        ctx.add(f"## {name} ({entry['unit']})\n\n" + table(header, rows))
    results["lowest_nll_counts"] = wins
    results["highest_nll_counts"] = losses
    ctx.add(
        f"Over the {total} corrupted settings, lowest NLL: "
        + ", ".join(f"{m} {n}" for m, n in wins.items())
        + "; highest NLL: "
        + ", ".join(f"{m} {n}" for m, n in losses.items())
        + "."
    )
