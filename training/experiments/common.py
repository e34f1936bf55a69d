"""Training and scoring helpers shared by the experiments, built on the project's own code.

Modes and simplexes are trained by :class:`training.espro.ComplexTrainer` (SPRO in
:mod:`training.spro`), drawn members get their BatchNorm statistics from
:func:`training.espro.draw_members`, members are scored by :func:`training.evaluation.score`
after the temperature (or variance scale) of :func:`training.evaluation.fit_checked_scale`
(fitted on the validation split, checked on the calibration split), and
outputs come from :class:`serving.engine.reference.ReferenceEngine`, exactly as ``espro train``
does. A member is a full state: parameters and buffers.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from serving.architectures import create_model
from serving.engine.reference import ReferenceEngine
from serving.manifest import InputSpec, Task
from serving.simplex import mix_vertices, sample_dirichlet
from training.checkpoint import Checkpoints
from training.config import TrainConfig, parse_config
from training.data import Dataset, load_dataset
from training.espro import (
    ComplexTrainer,
    TrainedSimplex,
    draw_members,
    generator,
    member_states,
)
from training.evaluation import fit_checked_scale, score
from training.splits import TrainingData
from training.spro import Params

log = logging.getLogger(__name__)

DEFAULT_LAMBDA = 0.1
"""The volume weight the λ search chose for the demo (docs/results.md); fixed here so that
the experiments spend their time on what they measure, not on the search."""

SCALE_FIT = (
    "fitted on the validation split and kept only if it lowers the NLL of the calibration "
    "split (else 1)"
)
"""How :func:`scores` fits a temperature (or variance scale); runs record it as ``scale_fit``."""

SCALE_FIT_UNCHECKED = "fitted on the validation split alone"
"""How results that record no ``scale_fit`` were calibrated (``training.evaluation.fit_scale``)."""

SPLITS = ("val", "calibration", "test")


def make_config(
    *,
    dataset: str,
    architecture: str,
    kwargs: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    modes: int = 3,
    mode_epochs: int = 20,
    mode_lr: float = 0.05,
    vertices: int = 2,
    vertex_epochs: int = 5,
    vertex_lr: float = 0.02,
    lam: float = DEFAULT_LAMBDA,
    samples: int = 5,
    per_simplex: int = 5,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> TrainConfig:
    """A validated training config, the same object ``espro train`` reads from YAML."""
    return parse_config(
        {
            "name": f"experiment-{dataset}",
            "seed": seed,
            "data": {"name": dataset, "options": data_options or {}},
            "model": {"architecture": architecture, "kwargs": kwargs or {}},
            "modes": {
                "count": modes,
                "epochs": mode_epochs,
                "lr": mode_lr,
                "batch_size": batch_size,
                "weight_decay": weight_decay,
            },
            "simplex": {
                "vertices": vertices,
                "epochs": vertex_epochs,
                "lr": vertex_lr,
                "samples": samples,
                "lambda": lam,
                "batch_size": batch_size,
                "weight_decay": weight_decay,
            },
            "draws": {"per_simplex": per_simplex},
        },
        "experiment config",
    )


@dataclass
class Setup:
    """A loaded data set with its normalisation, and a factory of the configured model."""

    config: TrainConfig
    dataset: Dataset
    input_spec: InputSpec
    num_outputs: int

    @property
    def task(self) -> Task:
        return self.dataset.task

    def make_model(self) -> nn.Module:
        return create_model(
            self.config.model.architecture,
            input_shape=self.dataset.input_shape,
            num_outputs=self.num_outputs,
            **self.config.model.kwargs,
        )

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_spec.normalise(x)

    @property
    def x_train(self) -> torch.Tensor:
        return self.normalised(self.dataset.train.x)

    @property
    def training_data(self) -> TrainingData:
        return TrainingData(self.dataset.train, self.input_spec, torch.device("cpu"))


def setup(config: TrainConfig) -> Setup:
    dataset = load_dataset(config.data)
    spec = InputSpec(shape=dataset.input_shape, mean=dataset.mean, std=dataset.std)
    outputs = len(dataset.class_names) if dataset.task is Task.CLASSIFICATION else 2
    return Setup(config, dataset, spec, outputs)


def train_simplexes(s: Setup, lam: float | None = None) -> list[TrainedSimplex]:
    """Every mode of ``s.config`` with its simplex, trained by the project's ComplexTrainer.

    Vertex ``j`` of mode ``m`` is seeded by ``(seed, m, j)`` alone, so the first ``k + 1``
    vertices of a simplex grown to order ``K >= k`` are exactly the ``k``-simplex.
    """
    lam = s.config.simplex.lam if lam is None else lam
    with tempfile.TemporaryDirectory(prefix="espro-experiment-") as scratch:
        trainer = ComplexTrainer(
            s.config,
            s.make_model,
            s.task,
            s.training_data,
            Checkpoints(scratch),
        )
        return trainer.train(lam or 0.0)


def mode_states(simplexes: Sequence[TrainedSimplex]) -> list[Params]:
    """Every simplex's mode as trained, with its own buffers (a deep ensemble's members)."""
    return [{**sm.vertices[0], **sm.buffers} for sm in simplexes]


def with_batchnorm(s: Setup, points: Sequence[Params], buffers: Params) -> list[Params]:
    """Full states of parameter ``points`` carrying ``buffers``, each with BatchNorm
    statistics of its own as the trainer recomputes them.

    Each point goes to :func:`training.espro.draw_members` as a lone mode, which draws it
    once, so the recomputation (batches, their number and order) is the trainer's own.
    """
    lone = [TrainedSimplex([p], dict(buffers), []) for p in points]
    return member_states(lone, draw_members(s.config, s.make_model(), lone, s.training_data))


def draw(
    s: Setup,
    vertices: Sequence[Params],
    buffers: Params,
    count: int,
    seed: int,
    *keys: object,
) -> tuple[list[Params], torch.Tensor]:
    """``count`` members drawn uniformly from the simplex (a lone mode is one member), as
    full states: ``buffers`` (the mode's) with BatchNorm recomputed for each member.

    The draws of ``(config.seed, m)`` are those :func:`training.espro.draw_members` makes
    for simplex ``m``."""
    if len(vertices) == 1:
        alphas = torch.ones(1, 1, dtype=torch.float64)
    else:
        alphas = sample_dirichlet(len(vertices), count, generator(seed, "draws", *keys))
    return with_batchnorm(s, [mix_vertices(vertices, a) for a in alphas], buffers), alphas


def member_outputs(s: Setup, members: Sequence[Params], x: torch.Tensor) -> torch.Tensor:
    """Outputs ``[S, N, ·]`` of members (full states) on raw inputs ``x``."""
    model = s.make_model()
    names = {n for n, _ in model.named_buffers()}
    for member in members:
        if missing := sorted(names - member.keys()):
            raise ValueError(
                f"a member lacks the buffers {missing[:5]}: build it with draw() or mode_states()"
            )
    return ReferenceEngine(model, list(members), s.input_spec).outputs(x)


def split_outputs(s: Setup, members: Sequence[Params]) -> dict[str, torch.Tensor]:
    """Outputs ``[S, N, ·]`` of members on the validation, calibration and test splits."""
    return {split: member_outputs(s, members, getattr(s.dataset, split).x) for split in SPLITS}


def scores(
    dataset: Dataset, outputs: Mapping[str, torch.Tensor], label: str = "members"
) -> dict[str, Any]:
    """Raw and calibrated test scores of member ``outputs`` on each split (:data:`SPLITS`).

    The scale is fitted on the validation split and kept only if it lowers the NLL of the
    calibration split (:func:`training.evaluation.fit_checked_scale`); its warning, if any, is
    logged under ``label`` and returned as ``scale_warning``.
    """
    task = dataset.task
    scale, warning = fit_checked_scale(
        task, outputs["val"], dataset.val.y, outputs["calibration"], dataset.calibration.y
    )
    if warning:
        log.warning("%s: %s", label, warning)
    return {
        "scale": scale,
        "scale_warning": warning,
        "raw": score(task, outputs["test"], dataset.test.y, 1.0),
        "calibrated": score(task, outputs["test"], dataset.test.y, scale),
    }


def flatten(params: Params) -> torch.Tensor:
    """All parameters as one float64 vector, in the dict's order."""
    return torch.cat([v.detach().double().reshape(-1) for v in params.values()])


def unflatten(vector: torch.Tensor, template: Params) -> Params:
    """The inverse of :func:`flatten`, with ``template``'s names, shapes and dtypes."""
    out, start = {}, 0
    for name, t in template.items():
        out[name] = vector[start : start + t.numel()].view(t.shape).to(t.dtype)
        start += t.numel()
    return out


def per_member(s: Setup, members: Sequence[Params], x: torch.Tensor, y: torch.Tensor) -> dict:
    """Each member's own loss (cross-entropy) and accuracy on raw inputs ``x``."""
    from training.metrics import accuracy, nll

    probs = torch.softmax(member_outputs(s, members, x), dim=-1)
    return {
        "loss": [nll(p, y) for p in probs],
        "accuracy": [accuracy(p, y) for p in probs],
    }


def loss_plane(
    s: Setup,
    points: Sequence[Params],
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    resolution: int,
    margin: float = 0.3,
) -> dict[str, Any]:
    """Loss and accuracy in the plane through three points (the paper's visualisation).

    The origin is the points' centre; ``u, v`` are the Gram–Schmidt basis of
    ``p_0 − c, p_1 − c``; the loss is sampled at ``c + a·u + b·v`` on a square grid, each
    grid point carrying ``buffers`` with its own BatchNorm statistics.
    """
    from training.metrics import accuracy, nll

    flat = torch.stack([flatten(p) for p in points])
    centre = flat.mean(dim=0)
    u = flat[0] - centre
    u = u / u.norm()
    v = flat[1] - centre
    v = v - (v @ u) * u
    v = v / v.norm()
    coords = [[float((p - centre) @ u), float((p - centre) @ v)] for p in flat]
    extent = max(abs(c) for xy in coords for c in xy) * (1 + margin)
    axis = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    loss = torch.empty(resolution, resolution)
    acc = torch.empty(resolution, resolution)
    for i, b in enumerate(axis):
        row = with_batchnorm(
            s, [unflatten(centre + a * u + b * v, points[0]) for a in axis], buffers
        )
        for j, probs in enumerate(torch.softmax(member_outputs(s, row, x), dim=-1)):
            loss[i, j] = nll(probs, y)
            acc[i, j] = accuracy(probs, y)
    return {
        "axis": axis.tolist(),
        "loss": loss.tolist(),
        "accuracy": acc.tolist(),
        "points": coords,
    }


def plot_plane(ax: Any, plane: dict[str, Any], labels: Sequence[str], title: str) -> Any:
    """Filled contours of log loss over the plane, with the three points and their triangle."""
    import numpy as np

    axis = np.asarray(plane["axis"])
    loss = np.log10(np.clip(np.asarray(plane["loss"]), 1e-4, None))
    image = ax.contourf(axis, axis, loss, levels=20, cmap="viridis")
    pts = np.asarray(plane["points"])
    ax.plot(*np.vstack([pts, pts[:1]]).T, color="white", lw=1, ls="--")
    for (px, py), label in zip(pts, labels, strict=True):
        ax.scatter([px], [py], color="red", s=25, zorder=3)
        ax.annotate(label, (px, py), color="white", xytext=(4, 4), textcoords="offset points")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return image
