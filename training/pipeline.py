"""``espro train`` end to end: data → modes → simplexes → draws → calibration → evaluation →
bundle. The bundle is written once, atomically, after everything else has succeeded."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from serving.architectures import create_model
from serving.bundle import Bundle, write_bundle
from serving.devices import resolve_device
from serving.manifest import InputSpec, Manifest, Task, buffer_key, draw_buffer_key, vertex_key
from serving.predictive import member_probabilities, pool
from serving.predictor import Predictor
from training.batchnorm import batchnorm_buffer_names
from training.budget import select
from training.calibration import (
    calibrate_abstention,
    calibrate_conformal,
)
from training.checkpoint import Checkpoints
from training.config import TrainConfig
from training.cost import Cost, total
from training.data import Dataset, load_dataset
from training.diagnostics import diagnose
from training.espro import (
    ComplexTrainer,
    Draw,
    Runner,
    SequentialRunner,
    TrainedSimplex,
    autocast_dtype,
    draw_members,
    simplex_specs,
)
from training.evaluation import evaluate, fit_checked_scale
from training.search import search_lambda
from training.splits import TrainingData, split_outputs

log = logging.getLogger(__name__)


def _tensors(simplexes: list[TrainedSimplex], draws: list[list[Draw]]) -> dict[str, torch.Tensor]:
    """Every tensor of the bundle under the names the manifest expects."""
    tensors = {}
    for m, simplex in enumerate(simplexes):
        for j, vertex in enumerate(simplex.vertices):
            tensors |= {vertex_key(m, j, n): t for n, t in vertex.items()}
        tensors |= {buffer_key(m, n): t for n, t in simplex.buffers.items()}
        for s, draw in enumerate(draws[m]):
            tensors |= {draw_buffer_key(m, s, n): t for n, t in draw.batchnorm.items()}
    return tensors


def calibrate(
    bundle: Bundle, dataset: Dataset, config: TrainConfig, device: torch.device | str = "cpu"
) -> tuple[Manifest, str | None]:
    """The manifest with temperature (or variance scale), conformal and abstention fitted,
    and a warning when the scale was rejected or is implausible.

    The scale is fitted on the validation split and kept only if it also helps on the
    calibration split."""
    manifest = bundle.manifest
    predictor = Predictor(
        bundle, device=device, allow_custom_architecture=config.model.allow_custom
    )
    val = split_outputs(predictor.outputs, dataset.val)
    outputs = split_outputs(predictor.outputs, dataset.calibration)
    cal = config.calibration
    temperature, warning = 1.0, None
    if cal.temperature:
        temperature, warning = fit_checked_scale(
            manifest.task, val, dataset.val.y, outputs, dataset.calibration.y
        )
    if manifest.task is Task.REGRESSION:
        return manifest.model_copy(update={"temperature": temperature}), warning
    cal_probs = pool(member_probabilities(outputs, temperature))
    labels = dataset.calibration.y
    fitted = {
        "temperature": temperature,
        "conformal": calibrate_conformal(cal_probs, labels, cal.conformal_method, cal.coverage),
        "abstention": calibrate_abstention(cal_probs, labels, cal.abstention_target_error),
    }
    return manifest.model_copy(update=fitted), warning


DIAGNOSTIC_SAMPLES = 2000
"""Training inputs used for the simplex diagnostics (a bound on their cost)."""


def train(
    config: TrainConfig,
    output: str | Path,
    *,
    workdir: str | Path | None = None,
    overwrite: bool = False,
    runner: Runner | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train, calibrate and evaluate a complex, write its bundle, return (path, results).

    Finished vertices are checkpointed in ``workdir`` (a temporary directory when ``None``).
    ``runner`` grows the simplexes (one after another by default; at once with
    :class:`training.distributed.RayRunner`).
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    started = time.perf_counter()
    device = resolve_device(config.device)
    autocast_dtype(config, device)
    # Read before a work directory is claimed for this config: a config whose data are
    # refused leaves nothing behind that would refuse the corrected one.
    dataset = load_dataset(config.data)
    with tempfile.TemporaryDirectory(prefix="espro-") as scratch:
        checkpoints = Checkpoints(workdir or scratch)
        runner = runner or SequentialRunner()
        return _train(config, dataset, device, output, checkpoints, runner, overwrite, started)


def _train(
    config: TrainConfig,
    dataset: Dataset,
    device: torch.device,
    output: Path,
    checkpoints: Checkpoints,
    runner: Runner,
    overwrite: bool,
    started: float,
) -> tuple[Path, dict[str, Any]]:
    task = dataset.task
    input_spec = InputSpec(
        shape=dataset.input_shape,
        mean=dataset.mean,
        std=dataset.std,
        image=config.data.image_spec(),
    )
    num_outputs = len(dataset.class_names) if task is Task.CLASSIFICATION else 2

    def make_model() -> torch.nn.Module:
        return create_model(
            config.model.architecture,
            input_shape=dataset.input_shape,
            num_outputs=num_outputs,
            allow_custom=config.model.allow_custom,
            **config.model.kwargs,
        ).to(device)

    data = TrainingData(dataset.train.for_device(device), input_spec, device, config.data.augment)
    val = TrainingData(dataset.val.for_device(device), input_spec, device)
    training: dict[str, Any] = {"config": config.model_dump(mode="json", by_alias=True)}
    cost: dict[str, Cost] = {}
    trainer = ComplexTrainer(config, make_model, task, data, checkpoints, runner, val)
    sample = dataset.train.subset(torch.arange(min(DIAGNOSTIC_SAMPLES, len(dataset.train))))
    search = None
    if config.budget is not None:
        selection = select(trainer, dataset.val, sample, input_spec)
        training["budget"] = selection.record
        cost["selection"] = selection.cost
        config, search = selection.config, selection.search
        trainer = dataclasses.replace(trainer, config=config)
    elif config.simplex.lam is None and config.simplex.vertices > 0:
        search = search_lambda(trainer, dataset.val, sample, input_spec)
    if search is not None:
        training["lambda_search"] = search.as_dict()
        cost["lambda_search"] = search.cost
        log.info("chose λ = %g on the validation split", search.best)
    lam = search.best if search is not None else config.simplex.lam
    training["lambda"] = lam
    simplexes = trainer.train(lam or 0.0)
    cost["modes"] = total(s.costs[0] for s in simplexes)
    cost["vertices"] = total(c for s in simplexes for c in s.costs[1:])
    model = make_model()
    draws = draw_members(config, model, simplexes, data)
    cost["batchnorm"] = total(d.cost for own in draws for d in own)
    phase_start = time.perf_counter()
    diagnostics = [
        diagnose(task, model, simplex, own, sample, dataset.val, input_spec)
        for simplex, own in zip(simplexes, draws, strict=True)
    ]
    cost["diagnostics"] = Cost(
        forward=sum((1 + len(own)) * (len(sample) + len(dataset.val)) for own in draws),
        seconds=time.perf_counter() - phase_start,
    )
    for m, d in enumerate(diagnostics):
        for warning in d.warnings:
            log.warning("simplex %d is %s", m, warning)
    training |= {
        "vertices": [[r.as_dict() for r in s.records] for s in simplexes],
        "diagnostics": [d.model_dump() for d in diagnostics],
    }
    manifest = Manifest(
        name=config.name,
        version=config.version,
        task=task,
        architecture={"name": config.model.architecture, "kwargs": config.model.kwargs},
        input=input_spec,
        num_outputs=num_outputs,
        class_names=dataset.class_names,
        parameter_names=tuple(n for n, _ in model.named_parameters()),
        buffer_names=tuple(n for n, _ in model.named_buffers()),
        batchnorm_buffer_names=batchnorm_buffer_names(model),
        simplexes=simplex_specs(config, simplexes, draws),
        training=training,
    )
    bundle = Bundle(path=output, manifest=manifest, tensors=_tensors(simplexes, draws), digest="")
    log.info(
        "calibrating on %d + %d held-out points", len(dataset.val.y), len(dataset.calibration.y)
    )
    phase_start = time.perf_counter()
    calibrated, warning = calibrate(bundle, dataset, config, device)
    if warning is not None:
        log.warning("calibration: %s", warning)
        training["calibration_warning"] = warning
    members = sum(len(own) for own in draws)
    held_out = len(dataset.val) + len(dataset.calibration)
    cost["calibration"] = Cost(
        forward=members * held_out, seconds=time.perf_counter() - phase_start
    )
    cost["total"] = total(cost.values())
    training["cost"] = {phase: c.as_dict() for phase, c in cost.items()}
    # The evaluation reads each method's cost from the manifest it scores.
    calibrated = calibrated.model_copy(update={"training": training})
    bundle = Bundle(output, calibrated, bundle.tensors, "")
    results = evaluate(
        bundle,
        dataset,
        config.evaluation.noise_severities,
        seed=config.seed,
        device=device,
        allow_custom_architecture=config.model.allow_custom,
    )
    training["total_seconds"] = time.perf_counter() - started
    final = bundle.manifest.model_copy(update={"metrics": results, "training": training})
    path = write_bundle(output, final, bundle.tensors, overwrite=overwrite)
    return path, results
