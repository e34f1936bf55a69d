"""``espro compare``: ESPRO against deep ensembles of equal members and of equal training cost,
over several seeds, with paired intervals and a verdict per claim.

For every seed the ESPRO complex (M modes, k-simplexes) is trained by the pipeline of
``espro train``, then a deep ensemble of M' modes, where M' is ESPRO's forward-backward passes
counted in modes (at least M). Both runs share a work directory, so the deep ensemble's first M
modes are ESPRO's own, loaded rather than retrained: DE(M) differs from ESPRO only by the
simplexes. Every method sees the same validation, test and noisy inputs, and is scored with its
own temperature (or variance scale) fitted on the validation split and checked on the
calibration split (:func:`training.evaluation.fit_checked_scale`). Differences are paired by
seed; :mod:`training.stats` turns them into Student-t intervals and verdicts.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from serving.bundle import Bundle, load_bundle
from serving.devices import resolve_device
from serving.errors import CommandError
from serving.manifest import Task, buffer_key, vertex_key
from serving.predictor import Predictor
from training.config import TrainConfig, parse_config
from training.corruptions import gaussian_noise
from training.cost import PHASES, Cost, total
from training.data import Dataset, load_dataset
from training.errors import ConfigError
from training.espro import generator
from training.evaluation import fit_checked_scale, mode_states, score
from training.experiments.report import jsonable, machine_info, pyplot, table
from training.pipeline import train
from training.splits import split_outputs
from training.stats import paired_difference, t_interval, verdict

log = logging.getLogger(__name__)

METRICS = {Task.CLASSIFICATION: ("nll", "error", "ece", "brier"), Task.REGRESSION: ("nll", "rmse")}
"""What the report shows, lower is better for each."""
CLAIMS = {Task.CLASSIFICATION: ("nll", "error"), Task.REGRESSION: ("nll", "rmse")}
"""The metrics of the headline claims "ESPRO is lower than DE(·)", calibrated."""
BASELINES = ("de_M", "de_M'", "de_T")
"""The deep ensembles ESPRO is compared with: DE(M), of its modes; DE(M'), of its passes; and
DE(M''), of its wall seconds (machine- and load-dependent, so secondary to passes)."""
"""DE(M), the same modes without simplexes, and DE(M'), a deep ensemble of equal cost."""
CLEAN = "clean"


def noise_setting(severity: float) -> str:
    return f"noise {severity:g}"


def seed_config(config: TrainConfig, seed: int, *, de_modes: int | None = None) -> TrainConfig:
    """``config`` at ``seed``; with ``de_modes``, the deep ensemble of that many of its modes."""
    data = config.model_dump(mode="json", by_alias=True) | {"seed": seed}
    if de_modes is not None:
        data["modes"]["count"] = de_modes
        data["simplex"]["vertices"] = 0
    return parse_config(data, "compare")


def mode_costs(bundle: Bundle) -> list[Cost]:
    """What training each mode cost (vertex 0 of every simplex)."""
    return [Cost.from_dict(vertices[0]) for vertices in bundle.manifest.training["vertices"]]


def equal_cost_modes(espro: Bundle) -> int:
    """M': ESPRO's forward-backward passes in units of its mean mode's, at least M."""
    modes = [c.passes for c in mode_costs(espro)]
    passes = Cost.from_dict(espro.manifest.training["cost"]["total"]).passes
    return max(len(modes), round(passes / statistics.fmean(modes)))


def shares_modes(espro: Bundle, de: Bundle) -> bool:
    """Whether the deep ensemble's first M modes are ESPRO's modes, tensor for tensor."""
    manifest = espro.manifest
    keys = [
        key
        for m in range(len(manifest.simplexes))
        for key in [vertex_key(m, 0, n) for n in manifest.parameter_names]
        + [buffer_key(m, n) for n in manifest.buffer_names]
    ]
    return all(torch.equal(espro.tensors[k], de.tensors[k]) for k in keys)


def _trained(config: TrainConfig, path: Path, workdir: Path, overwrite: bool) -> Bundle:
    """The bundle of ``config`` at ``path``: trained, or reused from an interrupted compare."""
    if path.exists() and not overwrite:
        bundle = load_bundle(path)
        if parse_config(bundle.manifest.training.get("config"), str(path)) != config:
            raise CommandError(f"{path} holds a bundle of another config; pass --overwrite")
        log.info("reusing %s", path)
    else:
        bundle = load_bundle(train(config, path, workdir=workdir, overwrite=overwrite)[0])
    if "cost" not in bundle.manifest.training:
        raise CommandError(f"{path}: the bundle records no training cost; pass --overwrite")
    return bundle


def _metrics(task: Task, outputs: torch.Tensor, targets: torch.Tensor, scale: float) -> dict:
    metrics = score(task, outputs, targets, scale)
    if task is Task.CLASSIFICATION:
        metrics["error"] = 1.0 - metrics["accuracy"]
    return metrics


def score_seed(
    espro: Bundle, de: Bundle, dataset: Dataset, severities: Sequence[float], config: TrainConfig
) -> tuple[dict[str, float], dict[str, dict[str, dict[str, dict[str, float]]]]]:
    """Scales and scores of ``espro`` and of ``de{m}`` (DE's first m modes) for every m.

    All members run on the very same inputs, noise included, drawn as
    :func:`training.evaluation.evaluate` draws it, so its numbers and these agree."""
    predictor = Predictor(
        espro,
        device=resolve_device(config.device),
        allow_custom_architecture=config.model.allow_custom,
    )
    espro_members = predictor.member_indices()
    de_members = predictor.add_members(mode_states(de))  # same architecture and inputs
    outputs = functools.partial(predictor.member_outputs, members=espro_members + de_members)

    def noisy(x: torch.Tensor, severity: float) -> torch.Tensor:
        return outputs(gaussian_noise(x, severity, espro.manifest.input, rng))

    task, count = espro.manifest.task, len(espro_members)
    rows = {"espro": slice(0, count)} | {
        f"de{m}": slice(count, count + m) for m in range(1, len(de_members) + 1)
    }
    val = split_outputs(outputs, dataset.val)
    check = split_outputs(outputs, dataset.calibration)
    scales = {
        name: fit_checked_scale(task, val[r], dataset.val.y, check[r], dataset.calibration.y)[0]
        for name, r in rows.items()
    }
    del val, check
    scores: dict[str, dict[str, dict[str, dict[str, float]]]] = {name: {} for name in rows}
    rng = generator(config.seed, "shift")
    settings: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [(CLEAN, outputs)]
    settings += [(noise_setting(s), functools.partial(noisy, severity=s)) for s in severities]
    for setting, fn in settings:  # one setting's outputs in memory at a time
        test = split_outputs(fn, dataset.test)
        for name, r in rows.items():
            scores[name][setting] = {
                "raw": _metrics(task, test[r], dataset.test.y, 1.0),
                "calibrated": _metrics(task, test[r], dataset.test.y, scales[name]),
            }
    return scales, scores


def run_seed(
    config: TrainConfig,
    seed: int,
    out: Path,
    dataset: Dataset,
    *,
    max_de_modes: int | None,
    overwrite: bool,
    keep_checkpoints: bool,
) -> dict[str, Any]:
    """Train ESPRO and its equal-cost deep ensemble at ``seed``, score both; the seed's record."""
    espro_config = seed_config(config, seed)
    workdir = out / "work" / f"seed-{seed}"
    label = f"ESPRO(M={config.modes.count}, k={config.simplex.vertices})"
    log.info("seed %d: training %s", seed, label)
    espro = _trained(espro_config, out / f"seed-{seed}" / "espro.bundle", workdir, overwrite)
    equal_cost = equal_cost_modes(espro)
    de_modes = equal_cost if max_de_modes is None else min(equal_cost, max_de_modes)
    passes = Cost.from_dict(espro.manifest.training["cost"]["total"]).passes
    log.info("seed %d: ESPRO took %d passes; training DE(M'=%d)", seed, passes, de_modes)
    de_config = seed_config(config, seed, de_modes=de_modes)
    de = _trained(de_config, out / f"seed-{seed}" / "de.bundle", workdir, overwrite)
    if not keep_checkpoints:
        shutil.rmtree(workdir, ignore_errors=True)
    severities = config.evaluation.noise_severities
    log.info(
        "seed %d: scoring %d methods, clean and at %d severities",
        seed,
        de_modes + 1,
        len(severities),
    )
    scales, scores = score_seed(espro, de, dataset, severities, espro_config)
    de_costs = mode_costs(de)
    return {
        "seed": seed,
        "modes": config.modes.count,
        "vertices": config.simplex.vertices,
        "de_modes": de_modes,
        "equal_cost_modes": equal_cost,
        "lambda": espro.manifest.training["lambda"],
        "shared_modes": shares_modes(espro, de),
        "bundles": {"espro": str(espro.path), "de": str(de.path)},
        "cost": {"espro": Cost.from_dict(espro.manifest.training["cost"]["total"]).as_dict()}
        | {f"de{m}": total(de_costs[:m]).as_dict() for m in range(1, de_modes + 1)},
        "espro_phases": espro.manifest.training["cost"],
        "scale": scales,
        "scores": scores,
    }


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


def _git(*args: str) -> str | None:
    """The output of a git command run where espro's source is, ``None`` without git."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def compare(
    config: TrainConfig,
    seeds: Sequence[int],
    out: str | Path,
    *,
    max_de_modes: int | None = None,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Run every seed, writing ``results.json``, ``report.md`` and ``cost.png`` into ``out``
    after each (so a long run shows its progress and an interrupted one keeps what it did);
    return the results.

    A rerun reuses the bundles of finished trainings and the checkpoints of unfinished ones."""
    if config.simplex.vertices == 0:
        raise ConfigError("simplex.vertices: 0 trains a deep ensemble; compare needs ESPRO (>= 1)")
    if max_de_modes is not None and max_de_modes < config.modes.count:
        raise CommandError(
            f"--max-de-modes: {max_de_modes} is fewer than the {config.modes.count} modes of DE(M)"
        )
    if not seeds or len(set(seeds)) != len(seeds):
        raise CommandError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = load_dataset(config.data)
    commit = _git("rev-parse", "HEAD")
    results: dict[str, Any] = {
        "command": command,
        "commit": commit,
        "dirty": bool(commit and _git("status", "--porcelain", "--untracked-files=no")),
        "config": config.model_dump(mode="json", by_alias=True),
        "task": str(dataset.task),
        "planned_seeds": list(seeds),
        "machine": machine_info(),
    }
    records: list[dict[str, Any]] = []
    for i, seed in enumerate(seeds):
        log.info("compare: seed %d (%d of %d)", seed, i + 1, len(seeds))
        records.append(
            run_seed(
                config,
                seed,
                out,
                dataset,
                max_de_modes=max_de_modes,
                overwrite=overwrite,
                keep_checkpoints=keep_checkpoints,
            )
        )
        results |= {
            "seeds": records,
            "summary": summarize(records, dataset.task),
            "wall_seconds": time.perf_counter() - started,
        }
        (out / "results.json").write_text(json.dumps(jsonable(results), indent=2) + "\n")
        (out / "report.md").write_text(report(results))
        plot_cost(out / "cost.png", results)
        log.info("compare: wrote %s, results.json and cost.png", out / "report.md")
    if not keep_checkpoints:
        shutil.rmtree(out / "work", ignore_errors=True)
    return results
