"""Test error and NLL against the number of draws per simplex (paper Appendix B.2)."""

from __future__ import annotations

import statistics
from typing import Any

from training.experiments.common import (
    SCALE_FIT,
    draw,
    make_config,
    mode_states,
    scores,
    setup,
    split_outputs,
    train_simplexes,
)
from training.experiments.report import Context, pyplot, table

TITLE = "Draws per simplex: ESPRO test error and NLL against the number of draws"


def run(ctx: Context) -> dict[str, Any]:
    config = make_config(
        dataset="mnist1d",
        architecture="cnn",
        kwargs={"channels": [32, 64], "hidden": 128},
        data_options={"n_samples": 400} if ctx.quick else {},
        seed=ctx.seed,
        **ctx.size(
            {
                "modes": 2,
                "mode_epochs": 2,
                "vertices": 1,
                "vertex_epochs": 1,
                "samples": 2,
                "batch_size": 64,
            },
            {"modes": 3, "mode_epochs": 30, "vertices": 2, "vertex_epochs": 6},
        ),
    )
    s = setup(config)
    with ctx.timed("training"):
        simplexes = train_simplexes(s)
    data = s.dataset
    counts = ctx.size([1, 2, 4], [1, 2, 3, 5, 10, 20, 40])
    repeats = ctx.size(2, 5)
    per_count: dict[str, Any] = {}
    warnings: dict[str, str] = {}
    with ctx.timed("evaluation"):
        de = scores(data, split_outputs(s, mode_states(simplexes)), "deep ensemble")
        if de["scale_warning"]:
            warnings["deep ensemble"] = de["scale_warning"]
        for count in counts:
            runs = []
            for r in range(repeats):
                members = [
                    m
                    for i, sm in enumerate(simplexes)
                    for m in draw(s, sm.vertices, sm.buffers, count, ctx.seed, "draws-exp", r, i)[0]
                ]
                label = f"{count} draws, set {r}"
                result = scores(data, split_outputs(s, members), label)
                if result["scale_warning"]:
                    warnings[label] = result["scale_warning"]
                runs.append(
                    {
                        "error": 1 - result["calibrated"]["accuracy"],
                        "nll": result["calibrated"]["nll"],
                    }
                )
            per_count[str(count)] = {
                key: {
                    "mean": statistics.mean(r[key] for r in runs),
                    "std": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
                    "runs": [r[key] for r in runs],
                }
                for key in ("error", "nll")
            }
    results = {
        "modes": config.modes.count,
        "order": config.simplex.vertices,
        "repeats": repeats,
        "deep_ensemble": {
            "error": 1 - de["calibrated"]["accuracy"],
            "nll": de["calibrated"]["nll"],
        },
        "draws": per_count,
        "scale_fit": SCALE_FIT,
        "temperature_warnings": warnings,
    }
    _report(ctx, results)
    return results


def _report(ctx: Context, results: dict[str, Any]) -> None:
    plt = pyplot()
    counts = list(results["draws"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("error", "nll"), strict=True):
        mean = [results["draws"][c][key]["mean"] for c in counts]
        std = [results["draws"][c][key]["std"] for c in counts]
        ax.errorbar([int(c) for c in counts], mean, yerr=std, marker="o", label="ESPRO")
        ax.axhline(results["deep_ensemble"][key], color="grey", ls="--", label="deep ensemble")
        ax.set_xscale("log")
        ax.set_xlabel("draws per simplex")
        ax.set_ylabel(f"test {key} (temperature-scaled)")
        ax.legend(fontsize=8)
    ctx.add(
        f"ESPRO with {results['modes']} modes x {results['order']}-simplex on MNIST-1D; each "
        f"count is repeated with {results['repeats']} independent sets of draws (mean ± std); "
        "the dashed line is the deep ensemble of the same modes."
    )
    ctx.figure(fig, "draws", "Test error and NLL against draws per simplex.")
    rows = [
        [
            c,
            results["draws"][c]["error"]["mean"],
            results["draws"][c]["error"]["std"],
            results["draws"][c]["nll"]["mean"],
            results["draws"][c]["nll"]["std"],
        ]
        for c in counts
    ]
    rows.append(
        [
            "deep ensemble",
            results["deep_ensemble"]["error"],
            0.0,
            results["deep_ensemble"]["nll"],
            0.0,
        ]
    )
    ctx.add(table(["draws per simplex", "error", "± std", "NLL", "± std"], rows))
    if warnings := results.get("temperature_warnings"):
        ctx.add(
            "Temperature warnings: " + "; ".join(f"{k}: {w}" for k, w in warnings.items()) + "."
        )
