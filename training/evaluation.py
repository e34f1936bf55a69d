"""Evaluate a complex against its own modes: single model, deep ensemble and ESPRO.

All three come from one bundle: the single model is the first mode, the deep ensemble is the
M modes, and ESPRO is every draw of every simplex. Each is scored on the clean test split and
under Gaussian-noise shift, raw and after its own temperature (or variance) scaling fitted on
the validation split. The outputs of all members are computed once per input set.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import torch

from serving.bundle import Bundle
from serving.manifest import Task, buffer_key
from serving.predictive import (
    ClassificationPrediction,
    gaussian_parameters,
    member_probabilities,
    pool,
)
from serving.predictor import Predictor, calibrated_prediction
from training.calibration import (
    checked_temperature,
    checked_variance_scale,
    fit_temperature,
    fit_variance_scale,
)
from training.corruptions import gaussian_noise
from training.cost import Cost, total
from training.data import Dataset
from training.espro import generator
from training.metrics import classification_metrics, regression_metrics
from training.splits import split_outputs


class Method(StrEnum):
    """The ensembles compared by every evaluation."""

    SINGLE = "single"
    """The first mode alone."""
    DEEP_ENSEMBLE = "deep_ensemble"
    """The M modes, one member each."""
    ESPRO = "espro"
    """Every draw of every simplex."""


def _comparison(
    bundle: Bundle, device: torch.device | str, allow_custom_architecture: bool
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[Method, list[int]]]:
    """Outputs ``[M + S, N, ·]`` of the M modes followed by the S ESPRO members, and which
    rows belong to which method."""
    predictor = Predictor(
        bundle, device=device, allow_custom_architecture=allow_custom_architecture
    )
    modes = predictor.add_members(mode_states(bundle))
    members = modes + predictor.member_indices()
    count = len(modes)
    return functools.partial(predictor.member_outputs, members=members), {
        Method.SINGLE: [0],
        Method.DEEP_ENSEMBLE: list(range(count)),
        Method.ESPRO: list(range(count, len(members))),
    }


def mode_states(bundle: Bundle) -> list[dict[str, torch.Tensor]]:
    """The bundle's modes as members (vertex 0 with its mode's buffers): the deep ensemble
    inside any bundle, for ``Predictor.add_members``."""
    names = bundle.manifest.buffer_names
    return [
        {**bundle.vertices(m)[0], **{n: bundle.tensors[buffer_key(m, n)] for n in names}}
        for m in range(len(bundle.manifest.simplexes))
    ]


def fit_scale(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Temperature (classification) or variance scale (regression) fitted to ``targets``."""
    if task is Task.CLASSIFICATION:
        return fit_temperature(outputs, targets)
    return fit_variance_scale(outputs, targets)


def fit_checked_scale(
    task: Task,
    fit_outputs: torch.Tensor,
    fit_targets: torch.Tensor,
    check_outputs: torch.Tensor,
    check_targets: torch.Tensor,
) -> tuple[float, str | None]:
    """:func:`fit_scale` on one held-out split, kept only if it lowers the NLL of another
    (else 1, with a warning): a perfectly fitted split would drive the temperature to 0."""
    if task is Task.CLASSIFICATION:
        return checked_temperature(fit_outputs, fit_targets, check_outputs, check_targets)
    return checked_variance_scale(fit_outputs, fit_targets, check_outputs, check_targets)


def score(task: Task, outputs: torch.Tensor, targets: torch.Tensor, scale: float) -> dict:
    """Metrics of member outputs ``[S, N, ·]`` at a temperature (or variance scale)."""
    if task is Task.CLASSIFICATION:
        return classification_metrics(pool(member_probabilities(outputs, scale)), targets)
    means, variances = gaussian_parameters(outputs)
    return regression_metrics(means, variances * scale, targets)


def evaluate(
    bundle: Bundle,
    dataset: Dataset,
    severities: list[float],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    allow_custom_architecture: bool = False,
) -> dict[str, Any]:
    """Scores of single, deep ensemble and ESPRO, clean and shifted, raw and calibrated."""
    manifest = bundle.manifest
    task = manifest.task
    outputs, methods = _comparison(bundle, device, allow_custom_architecture)
    val = split_outputs(outputs, dataset.val)
    check = split_outputs(outputs, dataset.calibration)
    scales = {
        method: manifest.temperature
        if method is Method.ESPRO
        else fit_checked_scale(
            task, val[index], dataset.val.y, check[index], dataset.calibration.y
        )[0]
        for method, index in methods.items()
    }

    def score_all(outputs: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
        return {
            method: {
                "raw": score(task, outputs[index], dataset.test.y, 1.0),
                "calibrated": score(task, outputs[index], dataset.test.y, scales[method]),
            }
            for method, index in methods.items()
        }

    def noisy(x: torch.Tensor, severity: float) -> torch.Tensor:
        return outputs(gaussian_noise(x, severity, manifest.input, rng))

    rng = generator(seed, "shift")
    test = split_outputs(outputs, dataset.test)
    results = {
        "temperature": {str(m): s for m, s in scales.items()},
        "test": score_all(test),
        "shift": {
            "gaussian_noise": {
                str(severity): score_all(
                    split_outputs(functools.partial(noisy, severity=severity), dataset.test)
                )
                for severity in severities
            }
        },
        "training_cost": training_cost(bundle),
    }
    if task is Task.CLASSIFICATION:
        results["decisions"] = decision_metrics(bundle, test[methods[Method.ESPRO]], dataset.test.y)
    return results


def decision_metrics(bundle: Bundle, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
    """How the bundle's prediction sets and abstention behave on labelled data."""
    prediction = calibrated_prediction(bundle.manifest, outputs)
    assert isinstance(prediction, ClassificationPrediction)
    result: dict[str, float] = {}
    if prediction.prediction_sets is not None:
        sets = prediction.prediction_sets
        result["set_coverage"] = float(sets[torch.arange(len(labels)), labels].double().mean())
        result["mean_set_size"] = float(sets.sum(dim=1).double().mean())
    if prediction.abstain is not None:
        kept = ~prediction.abstain
        result["abstention_rate"] = float(prediction.abstain.double().mean())
        result["selective_accuracy"] = (
            float((prediction.labels[kept] == labels[kept]).double().mean()) if kept.any() else 0.0
        )
    return result


def training_cost(bundle: Bundle) -> dict[str, dict[str, float]]:
    """What training each method cost (:mod:`training.cost`): its modes for the single model
    and the deep ensemble, everything (λ search included) for ESPRO."""
    training = bundle.manifest.training
    vertices: list[list[dict[str, Any]]] = training.get("vertices", [])
    if not vertices or "cost" not in training:
        return {}
    modes = [Cost.from_dict(v[0]) for v in vertices]
    return {
        Method.SINGLE: modes[0].as_dict(),
        Method.DEEP_ENSEMBLE: total(modes).as_dict(),
        Method.ESPRO: training["cost"]["total"],
    }


def _cell(values: list[float], digits: int = 4) -> str:
    """One value, or the mean ± standard deviation over several runs."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _methods(results: dict[str, Any]) -> list[str]:
    """The methods present in results, in the order of :class:`Method`."""
    return [str(m) for m in Method if m in results["test"]]


def _metric_names(task: Task) -> list[str]:
    return (
        ["accuracy", "nll", "brier", "ece", "aurc"]
        if task is Task.CLASSIFICATION
        else ["nll", "rmse"]
    )


def results_table(runs: list[dict[str, Any]], task: Task) -> str:
    """A Markdown table of the clean test scores of every method, raw and calibrated.

    With several runs (e.g. seeds) each cell is the mean ± standard deviation.
    """
    keys = _metric_names(task)
    header = "| method | scaling | " + " | ".join(keys) + " | train passes | train s |"
    lines = [header, "|" + "---|" * (len(keys) + 4)]
    for method in _methods(runs[0]):
        costs = [r["training_cost"][method] for r in runs if r.get("training_cost")]
        passes = _cell([c["passes"] for c in costs], digits=0) if costs else "-"
        seconds = _cell([c["seconds"] for c in costs], digits=1) if costs else "-"
        for scaling in ("raw", "calibrated"):
            cells = " | ".join(_cell([r["test"][method][scaling][k] for r in runs]) for k in keys)
            lines.append(f"| {method} | {scaling} | {cells} | {passes} | {seconds} |")
    return "\n".join(lines)


def shift_table(runs: list[dict[str, Any]], task: Task) -> str:
    """A Markdown table of calibrated scores under Gaussian noise, one row per severity."""
    keys = ["accuracy", "nll", "ece"] if task is Task.CLASSIFICATION else _metric_names(task)
    methods = _methods(runs[0])
    header = "| severity | " + " | ".join(f"{m} {k}" for m in methods for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(methods) * len(keys) + 1)]
    for severity in runs[0]["shift"]["gaussian_noise"]:
        cells = " | ".join(
            _cell([r["shift"]["gaussian_noise"][severity][m]["calibrated"][k] for r in runs])
            for m in methods
            for k in keys
        )
        lines.append(f"| {severity} | {cells} |")
    return "\n".join(lines)
