"""SPRO mode-connecting complexes: connecting vertices shared by the simplexes of several modes.

The complex ``C(w_1..w_M, θ_1..θ_k)`` holds one k-simplex ``[w_i, θ_1, …, θ_k]`` per mode.
Connecting vertices are trained one at a time, the modes and earlier ones frozen, on the
paper's objective: the task loss averaged over uniform draws from every simplex of the complex
minus ``λ`` times the volume term. Both terms are the ones :mod:`training.spro` uses for one
simplex (:func:`training.spro.task_loss`, ``log(h² + ε‖θ_0‖²)`` via
:func:`training.volume.squared_height`), averaged over the simplexes that share the vertex.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from serving.manifest import Task
from serving.simplex import mix_vertices, sample_dirichlet
from training.splits import minibatches
from training.spro import OptimSettings, Params, task_loss
from training.volume import log_volume, squared_distances, squared_height, squared_norm


@dataclass
class ConnectingHistory:
    loss: list[float]
    seconds: float


def train_connecting_vertex(
    model: nn.Module,
    task: Task,
    modes: Sequence[Params],
    connecting: Sequence[Params],
    x: torch.Tensor,
    y: torch.Tensor,
    optim: OptimSettings,
    generator: torch.Generator,
    *,
    lam: float,
    samples: int = 3,
    eps: float = 1e-4,
) -> tuple[Params, ConnectingHistory]:
    """One more connecting vertex, started at the centroid of the complex's vertices."""
    start_time = time.perf_counter()
    every = [*modes, *connecting]
    start = mix_vertices(every, [1.0 / len(every)] * len(every))
    trainable = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    optimiser = torch.optim.SGD(
        trainable.values(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )
    steps = optim.epochs * -(-len(x) // optim.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    floors = [eps * squared_norm(mode) for mode in modes]
    buffers = dict(model.named_buffers())
    model.train()
    history = ConnectingHistory([], 0.0)
    for _ in range(optim.epochs):
        losses = []
        for xb, yb in minibatches(x, y, optim.batch_size, generator):
            task_terms, volume_terms = [], []
            for mode, floor in zip(modes, floors, strict=True):
                vertices = [mode, *connecting, trainable]
                alphas = sample_dirichlet(len(vertices), samples, generator)
                task_terms += [
                    task_loss(
                        task, functional_call(model, (mix_vertices(vertices, a), buffers), xb), yb
                    )
                    for a in alphas
                ]
                volume_terms.append(torch.log(squared_height(squared_distances(vertices)) + floor))
            loss = torch.stack(task_terms).mean()
            objective = loss - lam * torch.stack(volume_terms).mean()
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        history.loss.append(sum(losses) / len(losses))
    history.seconds = time.perf_counter() - start_time
    return {k: v.detach() for k, v in trainable.items()}, history


def simplexes(modes: Sequence[Params], connecting: Sequence[Params]) -> list[list[Params]]:
    """The simplexes of the complex: each mode with all connecting vertices."""
    return [[mode, *connecting] for mode in modes]


def complex_log_volume(modes: Sequence[Params], connecting: Sequence[Params]) -> dict:
    """``log V`` of each simplex (not squared) and of the complex (the sum of volumes)."""
    logs = [0.5 * float(log_volume(s)) for s in simplexes(modes, connecting)]
    finite = [v for v in logs if math.isfinite(v)]
    total = float(torch.logsumexp(torch.tensor(finite), 0)) if finite else -math.inf
    return {"simplexes": logs, "complex": total}


def new_vertex_heights(modes: Sequence[Params], connecting: Sequence[Params]) -> list[float]:
    """Distance of the newest connecting vertex from the face it was added to, per simplex."""
    return [
        math.sqrt(max(float(squared_height(squared_distances(s))), 0.0))
        for s in simplexes(modes, connecting)
    ]
