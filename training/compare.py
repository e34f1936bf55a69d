"""``espro compare``: ESPRO against deep ensembles of equal members and of equal training cost,
over several seeds, with paired intervals and a verdict per claim.

For every seed the ESPRO complex (M modes, k-simplexes) is trained by the pipeline of
``espro train``, then a deep ensemble of M' modes, where M' is ESPRO's forward-backward passes
counted in modes (at least M). Both runs share a work directory, so the deep ensemble's first M
modes are ESPRO's own, loaded rather than retrained: DE(M) differs from ESPRO only by the
simplexes. Every method sees the same validation, test and noisy inputs, and is scored with its
own temperature (or variance scale) fitted on the validation split and checked on the
calibration split (:func:`training.evaluation.fit_checked_scale`). Differences are paired by
seed; :mod:`training.compare_summary` turns them into intervals, verdicts and the report.
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
from training.compare_summary import CLEAN, noise_setting, plot_cost, report, summarize
from training.config import TrainConfig, parse_config
from training.corruptions import gaussian_noise
from training.cost import Cost, total
from training.data import Dataset, load_dataset
from training.errors import ConfigError
from training.espro import generator
from training.evaluation import fit_checked_scale, mode_states, score
from training.experiments.report import jsonable, machine_info
from training.pipeline import train
from training.splits import split_outputs

log = logging.getLogger(__name__)


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
