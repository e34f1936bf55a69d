"""Single model, deep ensembles of 1-5 and ESPRO with 1-5 modes x simplex order 1-3.

One training per data set: five modes, each grown to a 3-simplex. Because every vertex is
seeded by its position alone, the first ``k + 1`` vertices of a mode's simplex are the
``k``-simplex, so each (modes, order) cell reuses those vertices and its training time is the
sum of the times of the vertices it uses (the paper's Figures 8 and A.7).

The equal-cost comparison pits each ESPRO cell against the cheapest deep ensemble that took at
least as long to train. With at most ``modes.count`` modes, most ESPRO cells cost more than the
largest deep ensemble; those cells have no rival of equal cost and are not counted.
"""

from __future__ import annotations

from typing import Any

import torch

from training.calibration import PLAUSIBLE_SCALE
from training.experiments.common import (
    SCALE_FIT,
    SCALE_FIT_UNCHECKED,
    SPLITS,
    draw,
    make_config,
    scores,
    setup,
    split_outputs,
    train_simplexes,
)
from training.experiments.report import Context, pyplot, table

TITLE = "Ensembles: ESPRO against deep ensembles of the same modes and of equal training time"
METRICS = ("error", "nll", "ece", "brier")
RIVAL_KEYS = ("rival_modes", "rival_seconds", "rival_time_ratio", "error_delta", "nll_delta")


def _configs(ctx: Context) -> dict[str, Any]:
    quick = {
        "modes": 2,
        "mode_epochs": 4,
        "vertices": 1,
        "vertex_epochs": 1,
        "samples": 2,
        "batch_size": 32,
    }
    return {
        "mnist1d": make_config(
            dataset="mnist1d",
            architecture="cnn",
            kwargs={"channels": [32, 64], "hidden": 128},
            data_options={"n_samples": 600} if ctx.quick else {},
            per_simplex=ctx.size(2, 5),
            seed=ctx.seed,
            **ctx.size(quick, {"modes": 5, "mode_epochs": 30, "vertices": 3, "vertex_epochs": 6}),
        ),
        "digits": make_config(
            dataset="digits",
            architecture="cnn",
            kwargs={"channels": [16, 32], "hidden": 64},
            per_simplex=ctx.size(2, 5),
            seed=ctx.seed,
            **ctx.size(quick, {"modes": 5, "mode_epochs": 40, "vertices": 3, "vertex_epochs": 8}),
        ),
    }


def _flat(metrics: dict[str, float]) -> dict[str, float]:
    return {
        "error": 1.0 - metrics["accuracy"],
        "nll": metrics["nll"],
        "ece": metrics["ece"],
        "brier": metrics["brier"],
    }


def run_dataset(ctx: Context, name: str, config: Any) -> dict[str, Any]:
    s = setup(config)
    with ctx.timed(f"{name} training"):
        simplexes = train_simplexes(s)
    modes, order = config.modes.count, config.simplex.vertices
    data = s.dataset
    outs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    with ctx.timed(f"{name} evaluation"):
        for m, simplex in enumerate(simplexes):
            for k in range(order + 1):
                members, _ = draw(
                    s,
                    simplex.vertices[: k + 1],
                    simplex.buffers,
                    config.draws.per_simplex,
                    ctx.seed,
                    m,
                    k,
                )
                outs[m, k] = split_outputs(s, members)
        cells = []
        for k in range(order + 1):
            for count in range(1, modes + 1):
                pooled = {p: torch.cat([outs[m, k][p] for m in range(count)]) for p in SPLITS}
                label = f"{name} {_label({'modes': count, 'order': k})}"
                result = scores(data, pooled, label)
                seconds = sum(c.seconds for sm in simplexes[:count] for c in sm.costs[: k + 1])
                cells.append(
                    {
                        "modes": count,
                        "order": k,
                        "members": int(pooled["test"].shape[0]),
                        "train_seconds": seconds,
                        "temperature": result["scale"],
                        "temperature_warning": result["scale_warning"],
                        "raw": _flat(result["raw"]),
                        "calibrated": _flat(result["calibrated"]),
                        "aurc": result["calibrated"]["aurc"],
                    }
                )
    return {
        "config": config.model_dump(mode="json", by_alias=True),
        "scale_fit": SCALE_FIT,
        "train_size": len(data.train),
        "test_size": len(data.test),
        "vertex_seconds": [[c.seconds for c in sm.costs] for sm in simplexes],
        "log_volumes": [
            [None if k == 0 else _log_volume(sm.vertices[: k + 1]) for k in range(order + 1)]
            for sm in simplexes
        ],
        "cells": cells,
    }


def _log_volume(vertices: list) -> float:
    from training.volume import log_volume

    return float(log_volume(vertices))


def _label(cell: dict[str, Any]) -> str:
    if cell["order"] == 0:
        return "single" if cell["modes"] == 1 else f"deep ensemble ({cell['modes']})"
    return f"ESPRO {cell['modes']} x {cell['order']}-simplex"


def _comparison(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """ESPRO against the deep ensemble of the same modes, and against the cheapest deep
    ensemble that took at least as long to train (``None`` when none did)."""
    de = {c["modes"]: c for c in cells if c["order"] == 0}
    same_modes, equal_cost = [], []
    for c in cells:
        if c["order"] == 0:
            continue
        base = de[c["modes"]]
        same_modes.append(
            {
                "modes": c["modes"],
                "order": c["order"],
                **{f"{m}_better": c["calibrated"][m] < base["calibrated"][m] for m in METRICS},
                "error_delta": c["calibrated"]["error"] - base["calibrated"]["error"],
                "nll_delta": c["calibrated"]["nll"] - base["calibrated"]["nll"],
            }
        )
        costlier = [d for d in de.values() if d["train_seconds"] >= c["train_seconds"]]
        entry = {
            "modes": c["modes"],
            "order": c["order"],
            "seconds": c["train_seconds"],
            **dict.fromkeys(RIVAL_KEYS),
        }
        if costlier:
            rival = min(costlier, key=lambda d: d["train_seconds"])
            entry |= {
                "rival_modes": rival["modes"],
                "rival_seconds": rival["train_seconds"],
                "rival_time_ratio": rival["train_seconds"] / c["train_seconds"],
                "error_delta": c["calibrated"]["error"] - rival["calibrated"]["error"],
                "nll_delta": c["calibrated"]["nll"] - rival["calibrated"]["nll"],
            }
        equal_cost.append(entry)
    rivalled = [r for r in equal_cost if r["rival_modes"] is not None]
    return {
        "same_modes": same_modes,
        "equal_cost": equal_cost,
        "summary": {
            **{
                f"espro_better_{m}_same_modes": sum(r[f"{m}_better"] for r in same_modes)
                for m in METRICS
            },
            "cells": len(same_modes),
            "largest_ensemble_modes": max(de),
            "largest_ensemble_seconds": de[max(de)]["train_seconds"],
            "equal_cost_cells": len(rivalled),
            "espro_better_error_equal_cost": sum(r["error_delta"] < 0 for r in rivalled),
            "espro_better_nll_equal_cost": sum(r["nll_delta"] < 0 for r in rivalled),
        },
    }


def _scale_flag(cell: dict[str, Any]) -> str | None:
    """The temperature fit's warning, or for results that record none, an implausible T."""
    if cell.get("temperature_warning"):
        return cell["temperature_warning"]
    low, high = PLAUSIBLE_SCALE
    if "temperature_warning" not in cell and not low <= cell["temperature"] <= high:
        return f"temperature {cell['temperature']:.3g} is outside the plausible [{low:g}, {high:g}]"
    return None


def _plots(ctx: Context, results: dict[str, Any]) -> None:
    plt = pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        cells = results[name]["cells"]
        for k in sorted({c["order"] for c in cells}):
            row = sorted((c for c in cells if c["order"] == k), key=lambda c: c["modes"])
            label = "deep ensemble" if k == 0 else f"ESPRO, {k}-simplex"
            ax.plot(
                [c["train_seconds"] for c in row],
                [100 * c["calibrated"]["error"] for c in row],
                marker="o",
                label=label,
            )
            for c in row:
                ax.annotate(
                    str(c["modes"]),
                    (c["train_seconds"], 100 * c["calibrated"]["error"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel("training time (s, all vertices used)")
        ax.set_ylabel("test error (%)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    ctx.figure(
        fig,
        "error_vs_time",
        "Test error against training time (cf. the paper's Figure A.7); the number at each "
        "point is the number of modes.",
    )
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        cells = results[name]["cells"]
        for row_index, metric in enumerate(("error", "nll")):
            ax = axes[row_index][col]
            for k in sorted({c["order"] for c in cells}):
                row = sorted((c for c in cells if c["order"] == k), key=lambda c: c["modes"])
                ax.plot(
                    [c["modes"] for c in row],
                    [c["calibrated"][metric] for c in row],
                    marker="o",
                    label="deep ensemble" if k == 0 else f"ESPRO, {k}-simplex",
                )
            ax.set_xlabel("modes (independently trained models)")
            ax.set_ylabel(f"test {metric} (temperature-scaled)")
            ax.set_title(name)
            ax.legend(fontsize=8)
    ctx.figure(fig, "vs_modes", "Error and NLL against the number of modes (cf. Figure 8).")


def run(ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, config in _configs(ctx).items():
        results[name] = run_dataset(ctx, name, config)
        results[name]["comparison"] = _comparison(results[name]["cells"])
    _report(ctx, results)
    return results


def _report(ctx: Context, results: dict[str, Any]) -> None:
    """The report of ``results`` (what :func:`run` returns, or a results.json's)."""
    fit = next(iter(results.values())).get("scale_fit", SCALE_FIT_UNCHECKED)
    ctx.add(
        "Modes are SGD solutions of a small CNN; ESPRO grows a k-simplex at each with SPRO "
        "(λ fixed, see `training/experiments/common.py`) and pools "
        "`draws.per_simplex` uniform draws per simplex, so ESPRO with M modes has that many "
        f"times the members of the deep ensemble of M. *raw* is as trained, *cal* after a "
        f"temperature {fit} (each row its own temperature). `train s` sums the wall time of "
        "the vertices the row uses."
    )
    _plots(ctx, results)
    for name, r in results.items():
        epochs = r["config"]["modes"]["epochs"], r["config"]["simplex"]["epochs"]
        ctx.add(
            f"## {name} ({r['train_size']} training, {r['test_size']} test examples; modes "
            f"trained {epochs[0]} epochs, each further vertex {epochs[1]})"
        )
        rows = [
            [
                _label(c),
                c["members"],
                f"{c['train_seconds']:.1f}",
                *[v for m in METRICS for v in (c["raw"][m], c["calibrated"][m])],
            ]
            for c in sorted(r["cells"], key=lambda c: (c["order"], c["modes"]))
        ]
        header = ["method", "members", "train s"]
        header += [f"{m} {s}" for m in METRICS for s in ("raw", "cal")]
        ctx.add(table(header, rows))
        flagged = [(c, flag) for c in r["cells"] if (flag := _scale_flag(c))]
        if flagged:
            ctx.add(
                "Temperature fits to distrust (their *cal* columns are not calibrated scores): "
                + "; ".join(f"{_label(c)}: {flag}" for c, flag in flagged)
                + "."
            )
        comparison = _comparison(r["cells"])
        summary = comparison["summary"]
        ctx.add(
            f"ESPRO cells better than the deep ensemble of the same modes (calibrated), out of "
            f"{summary['cells']}: error {summary['espro_better_error_same_modes']}, NLL "
            f"{summary['espro_better_nll_same_modes']}, ECE "
            f"{summary['espro_better_ece_same_modes']}, Brier "
            f"{summary['espro_better_brier_same_modes']}."
        )
        budget_rows = [
            [
                f"ESPRO {b['modes']} x {b['order']}",
                f"{b['seconds']:.1f}",
                *(
                    [
                        f"DE {b['rival_modes']} ({b['rival_seconds']:.1f} s)",
                        f"{b['rival_time_ratio']:.2f}",
                        b["error_delta"],
                        b["nll_delta"],
                    ]
                    if b["rival_modes"] is not None
                    else ["no rival of equal cost", "—", "—", "—"]
                ),
            ]
            for b in comparison["equal_cost"]
        ]
        ctx.add(
            "Equal cost: each ESPRO cell against the cheapest deep ensemble that took at least "
            "as long to train (time ratio = DE's time / ESPRO's; Δ = ESPRO − DE, calibrated; "
            "negative favours ESPRO). The largest deep ensemble here, DE "
            f"{summary['largest_ensemble_modes']}, took "
            f"{summary['largest_ensemble_seconds']:.1f} s; an ESPRO cell that took longer has "
            f"no rival of equal cost. {summary['equal_cost_cells']} of {summary['cells']} cells "
            f"have one; ESPRO's error is lower in {summary['espro_better_error_equal_cost']} "
            f"of them and its NLL in {summary['espro_better_nll_equal_cost']}.\n\n"
            + table(["ESPRO", "train s", "rival", "time ratio", "Δ error", "Δ NLL"], budget_rows)
        )
