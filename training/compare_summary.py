"""The summary of ``espro compare`` over seeds: intervals of every score and cost, paired
differences with their verdicts, ``report.md`` and the cost figure. Plain functions of the
records :mod:`training.compare` writes, so a report can be rendered again from
``results.json``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from serving.manifest import Task
from training.cost import PHASES
from training.experiments.report import pyplot, table
from training.stats import paired_difference, t_interval, verdict

METRICS = {Task.CLASSIFICATION: ("nll", "error", "ece", "brier"), Task.REGRESSION: ("nll", "rmse")}
"""What the report shows, lower is better for each."""
CLAIMS = {Task.CLASSIFICATION: ("nll", "error"), Task.REGRESSION: ("nll", "rmse")}
"""The metrics of the headline claims "ESPRO is lower than DE(·)", calibrated."""
BASELINES = ("de_M", "de_M'", "de_T")
"""The deep ensembles ESPRO is compared with: DE(M), of its modes; DE(M'), of its passes; and
DE(M''), of its wall seconds (machine- and load-dependent, so secondary to passes)."""
CLEAN = "clean"


def noise_setting(severity: float) -> str:
    return f"noise {severity:g}"


def _series(records: list[dict[str, Any]], section: str, method: str, *path: str) -> list[float]:
    """One number per seed: ``section`` (``scores`` or ``cost``) of ``method`` at ``path``.

    ``method`` is ``espro``, ``de{m}``, or a role of :data:`BASELINES`."""
    values = []
    for r in records:
        roles = {
            "de_M": f"de{r['modes']}",
            "de_M'": f"de{r['de_modes']}",
            "de_T": f"de{equal_time_modes(r)}",
        }
        value = r[section][roles.get(method, method)]
        for key in path:
            value = value[key]
        values.append(value)
    return values


def equal_time_modes(record: dict[str, Any]) -> int:
    """The most modes (at least 1, at most M') whose training took no longer than ESPRO's
    whole run, in wall seconds."""
    budget = record["cost"]["espro"]["seconds"]
    fits = range(1, record["de_modes"] + 1)
    return max((m for m in fits if record["cost"][f"de{m}"]["seconds"] <= budget), default=1)


def summarize(records: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    """Intervals over seeds of every score and cost, and the paired differences with verdicts."""
    settings = list(records[0]["scores"]["espro"])
    roles = ("espro", *BASELINES)
    scores = {
        role: {
            s: {
                scaling: {
                    k: t_interval(_series(records, "scores", role, s, scaling, k)).as_dict()
                    for k in METRICS[task]
                }
                for scaling in ("raw", "calibrated")
            }
            for s in settings
        }
        for role in roles
    }
    cost = {
        role: {
            k: t_interval(_series(records, "cost", role, k)).as_dict()
            for k in ("passes", "forward", "seconds")
        }
        for role in roles
    }
    differences = []
    for baseline in BASELINES:
        for s in settings:
            for k in METRICS[task]:
                diff = paired_difference(
                    _series(records, "scores", "espro", s, "calibrated", k),
                    _series(records, "scores", baseline, s, "calibrated", k),
                )
                differences.append(
                    {
                        "baseline": baseline,
                        "setting": s,
                        "metric": k,
                        "claim": k in CLAIMS[task],
                        "difference": diff.as_dict(),
                        "verdict": verdict(diff),
                    }
                )
    curve = [
        {"modes": m, "passes": t_interval(_series(records, "cost", f"de{m}", "passes")).as_dict()}
        | {
            k: t_interval(_series(records, "scores", f"de{m}", CLEAN, "calibrated", k)).as_dict()
            for k in CLAIMS[task]
        }
        for m in range(1, min(r["de_modes"] for r in records) + 1)
    ]
    return {"scores": scores, "cost": cost, "differences": differences, "de_curve": curve}


NAMES = {"nll": "NLL", "error": "error", "ece": "ECE", "brier": "Brier", "rmse": "RMSE"}


def labels(records: list[dict[str, Any]]) -> dict[str, str]:
    """How the report names ``espro`` and the roles of :data:`BASELINES`."""
    modes, order = records[0]["modes"], records[0]["vertices"]

    def span(counts: set[int]) -> str:
        return str(min(counts)) if len(counts) == 1 else f"{min(counts)}-{max(counts)}"

    return {
        "espro": f"ESPRO({modes}, {order})",
        "de_M": f"DE({modes})",
        "de_M'": f"DE({span({r['de_modes'] for r in records})})",
        "de_T": f"DE({span({equal_time_modes(r) for r in records})}, equal s)",
    }


def _cell(interval: dict[str, Any], digits: int = 4) -> str:
    """Mean ± the half-width of its 95 % interval (the mean alone for one seed)."""
    if interval["high"] is None:
        return f"{interval['mean']:.{digits}f}"
    return f"{interval['mean']:.{digits}f} ± {interval['high'] - interval['mean']:.{digits}f}"


def _difference(interval: dict[str, Any]) -> str:
    if interval["high"] is None:
        return f"{interval['mean']:+.4f}"
    return f"{interval['mean']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def report(results: dict[str, Any]) -> str:
    """``report.md``: setup, verdicts, paired differences, costs and scores."""
    records, summary, task = results["seeds"], results["summary"], Task(results["task"])
    name = labels(records)
    seeds = [r["seed"] for r in records]
    done = f"{len(records)} of {len(results['planned_seeds'])} seeds (partial: still running)"
    lines = [
        f"# {name['espro']} against deep ensembles: {results['config']['name']}",
        "",
        f"Command: `{results['command']}`  ",
        f"espro commit: {results['commit'] or 'unknown'}"
        + (" (with uncommitted changes)" if results["dirty"] else "")
        + "  ",
        f"Seeds: {', '.join(map(str, seeds))}"
        + (f" ({done})" if len(records) < len(results["planned_seeds"]) else "")
        + "  ",
        f"M = {records[0]['modes']} modes, k = {records[0]['vertices']} vertices added to each, "
        f"{results['config']['draws']['per_simplex']} draws per simplex; "
        "λ = " + ", ".join(f"{r['lambda']:g}" for r in records) + " (per seed)  ",
        "M' (deep ensemble of ESPRO's cost) = "
        + ", ".join(
            str(r["de_modes"])
            + (
                f" (capped from {r['equal_cost_modes']})"
                if r["de_modes"] < r["equal_cost_modes"]
                else ""
            )
            for r in records
        )
        + " (per seed)  ",
        "M'' (deep ensemble of ESPRO's wall seconds) = "
        + ", ".join(str(equal_time_modes(r)) for r in records)
        + " (per seed; seconds depend on the machine and on what else it ran)  ",
        "DE's first M modes are ESPRO's modes: "
        + ", ".join("yes" if r["shared_modes"] else "no" for r in records)
        + " (per seed)  ",
        f"Machine: {results['machine']['platform']}, torch {results['machine']['torch']}. "
        "Raw numbers: [results.json](results.json); figure: [cost.png](cost.png).",
        "",
        "Every interval is a two-sided 95 % Student-t interval over seeds: it measures the "
        "variation of training, on one fixed test set, and is not corrected for the number of "
        "comparisons. Differences are ESPRO minus the deep ensemble, paired by seed (same seed, "
        "data and noise). A claim that ESPRO is lower *holds* when the whole interval is below 0, "
        "*does not hold* when it is above 0, and is *inconclusive* otherwise. Every method is "
        "scaled by its own temperature (variance scale) fitted on the validation split, kept "
        "only if it also lowers the NLL of the calibration split (else 1).",
        "",
        "## Verdicts: ESPRO lower than the deep ensemble (calibrated)",
        "",
    ]
    claims = [d for d in summary["differences"] if d["claim"]]
    columns = [(b, k) for k in CLAIMS[task] for b in BASELINES]
    by_cell = {(d["setting"], d["baseline"], d["metric"]): d for d in claims}
    settings = list(summary["scores"]["espro"])
    lines.append(
        table(
            ["setting", *(f"{NAMES[k]} vs {name[b]}" for b, k in columns)],
            [[s, *(f"{by_cell[s, b, k]['verdict']}" for b, k in columns)] for s in settings],
        )
    )
    lines += ["", "## Paired differences (ESPRO − DE, calibrated)", ""]
    lines.append(
        table(
            ["setting", "metric", "baseline", "mean [95 % interval]", "verdict"],
            [
                [
                    d["setting"],
                    NAMES[d["metric"]],
                    name[d["baseline"]],
                    _difference(d["difference"]),
                    d["verdict"],
                ]
                for d in summary["differences"]
            ],
        )
    )
    lines += [
        "",
        "## Training cost",
        "",
        "Forward-backward example passes are the unit (see training/cost.py); forward-only "
        "passes and wall seconds are shown apart. ESPRO's cost is its whole run (λ search if any, "
        "modes, vertices, BatchNorm, diagnostics, calibration); a deep ensemble's is the "
        "training of its modes alone, which favours the deep ensemble.",
        "",
    ]
    mode_passes = statistics.fmean(  # the unit M' is counted in
        r["cost"][f"de{r['de_modes']}"]["passes"] / r["de_modes"] for r in records
    )
    lines.append(
        table(
            ["method", "passes", "in modes", "forward passes", "seconds"],
            [
                [
                    name[role],
                    _cell(cost["passes"], 0),
                    f"{cost['passes']['mean'] / mode_passes:.2f}",
                    _cell(cost["forward"], 0),
                    _cell(cost["seconds"], 1),
                ]
                for role, cost in summary["cost"].items()
            ],
        )
    )
    phases = [p for p in PHASES if p in records[0]["espro_phases"]]
    lines += ["", f"{name['espro']} by phase (mean over seeds):", ""]
    lines.append(
        table(
            ["phase", "passes", "forward passes", "seconds"],
            [
                [
                    p,
                    *(
                        round(statistics.fmean(r["espro_phases"][p][k] for r in records))
                        for k in ("passes", "forward")
                    ),
                    statistics.fmean(r["espro_phases"][p]["seconds"] for r in records),
                ]
                for p in phases
            ],
            digits=1,
        )
    )

    for s in settings:
        lines += ["", f"## Scores: {s}", ""]
        lines.append(
            table(
                ["method", "scaling", *(NAMES[k] for k in METRICS[task])],
                [
                    [
                        name[role],
                        scaling,
                        *(_cell(by_setting[s][scaling][k]) for k in METRICS[task]),
                    ]
                    for role, by_setting in summary["scores"].items()
                    for scaling in ("raw", "calibrated")
                ],
            )
        )
    return "\n".join(lines) + "\n"


def plot_cost(path: Path, results: dict[str, Any]) -> None:
    """Calibrated clean scores against training passes: DE(m) for m = 1..M' as a line with its
    band over seeds, ESPRO as a point with interval bars."""
    plt = pyplot()
    summary, task = results["summary"], Task(results["task"])
    name = labels(results["seeds"])
    curve, metrics = summary["de_curve"], CLAIMS[task]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)

    def bars(interval: dict[str, Any]) -> list[list[float]] | None:
        if interval["high"] is None:
            return None
        return [[interval["mean"] - interval["low"]], [interval["high"] - interval["mean"]]]

    x = [c["passes"]["mean"] for c in curve]
    for ax, k in zip(axes[0], metrics, strict=True):
        y = [c[k]["mean"] for c in curve]
        ax.plot(x, y, "o-", color="C0", label="DE(m), m = 1..M'")
        if curve[0][k]["high"] is not None:
            low, high = [c[k]["low"] for c in curve], [c[k]["high"] for c in curve]
            ax.fill_between(x, low, high, color="C0", alpha=0.2, label="95 % interval")
        for c, xm, ym in zip(curve, x, y, strict=True):
            ax.annotate(str(c["modes"]), (xm, ym), textcoords="offset points", xytext=(0, 6))
        espro, cost = summary["scores"]["espro"][CLEAN]["calibrated"][k], summary["cost"]["espro"]
        ax.errorbar(
            [cost["passes"]["mean"]],
            [espro["mean"]],
            xerr=bars(cost["passes"]),
            yerr=bars(espro),
            fmt="s",
            color="C3",
            capsize=4,
            label=name["espro"],
        )
        ax.set_xlabel("training cost (forward-backward example passes)")
        ax.set_ylabel(f"calibrated {NAMES[k]}, clean test")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    seeds = len(results["seeds"])
    fig.suptitle(f"clean test; bands and bars: 95 % intervals over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
