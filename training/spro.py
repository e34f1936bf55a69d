"""SPRO: grow a simplex of low-loss weights from a mode, one vertex at a time.

Any ``nn.Module`` becomes a simplex through ``torch.func.functional_call``: the module is
only a template, and the weights it runs with are ``w(α) = Σ_j α_j θ_j``. Only the newest
vertex is a leaf that requires gradients; earlier vertices are frozen tensors.

The loss for the vertex being trained is the task loss averaged over ``S`` points drawn
uniformly from the simplex, minus ``λ · log(h² + ε‖θ_0‖²)``, where ``h`` is the new vertex's
height above the face of the frozen ones.

Why this is the paper's ``−λ log V²`` with λ normalised per vertex: ``V_k = V_{k−1} · h / k``
and ``V_{k−1}`` is frozen, so ``log V²_k = 2 log h + const`` and the gradient on the new
vertex is the same whatever the order ``k``. λ therefore needs no order-dependent scaling:
it weighs the log of the squared height of every new vertex alike. (The paper's code divides
λ by the log-volume of a random simplex, which leaves a per-vertex weight near 1e-7 at its
default and the simplex barely leaves its mode.) A new vertex starts at the centroid, where
``h = 0``; ``ε`` (relative to the mode's squared norm ``‖θ_0‖²``) bounds the push there to
``λ / √(ε‖θ_0‖²)`` instead of the ``2λ/h`` that would throw the vertex far away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from serving.manifest import Task
from serving.predictive import gaussian_parameters
from serving.simplex import mix_vertices, sample_dirichlet
from training.volume import squared_distances, squared_height, squared_norm

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OptimSettings:
    """SGD with momentum and a single cosine cycle over the vertex's epochs."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128


@dataclass
class VertexHistory:
    """Per-epoch means of the task loss and of the volume term of one vertex's training,
    and what the training cost (:mod:`training.cost`)."""

    loss: list[float] = field(default_factory=list)
    log_height: list[float] = field(default_factory=list)
    """Mean ``log(h² + ε‖θ_0‖²)`` per epoch (empty for a mode)."""
    val_loss: list[float] = field(default_factory=list)
    """Validation loss after each epoch (only when a mode stops early)."""
    best_epoch: int | None = None
    """The epoch (from 1) whose weights were kept, when a mode stops early."""
    passes: int = 0
    """Forward-backward example passes: S per example of a SPRO step, 1 of a mode's."""
    forward: int = 0
    """Forward-only example passes (the validation loss of early stopping)."""

    @property
    def epochs(self) -> int:
        return len(self.loss)


@dataclass(frozen=True)
class EarlyStopping:
    """Stop a mode when its validation loss has not improved for ``patience`` epochs and keep
    the weights of its best epoch. ``val`` yields normalised ``(inputs, targets)`` in order."""

    val: LabelledBatches
    patience: int
    batch_size: int = 512


class Batches(Protocol):
    """Training data as SGD reads them (:class:`training.splits.TrainingData`, or a
    :class:`training.splits.TensorSplit` of inputs ready for the model)."""

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Inputs and targets on the model's device, shuffled by ``generator``."""
        ...


class LabelledBatches(Protocol):
    """A held-out split as a model reads it (:meth:`training.splits.TrainingData.labelled`)."""

    def __len__(self) -> int: ...

    def labelled(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def task_loss(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, Gaussian NLL for regression (mean over the batch)."""
    if task is Task.CLASSIFICATION:
        return nn.functional.cross_entropy(outputs, targets)
    mean, var = gaussian_parameters(outputs)
    return nn.functional.gaussian_nll_loss(mean, targets, var, full=True)


class SimplexTrainer:
    """Grows a simplex at one mode: ``fit_mode`` trains vertex 0, ``add_vertex`` the rest.

    ``vertices`` and ``buffers`` are plain tensors; ``buffers`` follow the last training
    phase (use :func:`training.batchnorm.recompute_batchnorm` for a drawn member).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        lam: float = 0.0,
        samples: int = 5,
        eps: float = 1e-4,
        vertices: Sequence[Params] = (),
        buffers: Mapping[str, torch.Tensor] | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        if lam < 0 or samples < 1 or eps <= 0:
            raise ValueError(
                f"expected lam >= 0, samples >= 1 and eps > 0, got {lam}, {samples}, {eps}"
            )
        self.model = model
        self.task = Task(task)
        self.lam = lam
        self.samples = samples
        self.eps = eps
        self.autocast = autocast
        """Run forward passes under ``torch.autocast`` with this dtype (``None``: float32)."""
        self.vertices: list[Params] = [{k: t.detach() for k, t in v.items()} for v in vertices]
        self.buffers: Params = {
            k: v.detach().clone()
            for k, v in (buffers if buffers is not None else dict(model.named_buffers())).items()
        }

    @property
    def order(self) -> int:
        """k for a k-simplex (``-1`` before the mode is trained)."""
        return len(self.vertices) - 1

    def fit_mode(
        self,
        data: Batches,
        optim: OptimSettings,
        generator: torch.Generator,
        *,
        init: Mapping[str, torch.Tensor] | None = None,
        stopping: EarlyStopping | None = None,
        desc: str = "mode",
    ) -> VertexHistory:
        """Train vertex 0 by ordinary SGD, from ``init`` or the module's own initial weights,
        for ``optim.epochs`` or until ``stopping`` says the validation loss stopped improving."""
        if self.vertices:
            raise RuntimeError("the mode is already trained; call add_vertex to grow the simplex")
        start = init if init is not None else dict(self.model.named_parameters())
        return self._train(start, data, optim, generator, desc, stopping)

    def add_vertex(
        self,
        data: Batches,
        optim: OptimSettings,
        generator: torch.Generator,
        *,
        desc: str = "vertex",
    ) -> VertexHistory:
        """Add a vertex at the centroid of the existing ones and train it; the rest stay frozen."""
        if not self.vertices:
            raise RuntimeError("train the mode first: call fit_mode before add_vertex")
        centroid = mix_vertices(self.vertices, [1.0 / len(self.vertices)] * len(self.vertices))
        return self._train(centroid, data, optim, generator, desc)

    def _volume_term(self, trainable: Params, floor: float) -> torch.Tensor:
        """``log(h² + floor)`` for the vertex being trained, ``floor = ε‖θ_0‖²``."""
        return torch.log(squared_height(squared_distances([*self.vertices, trainable])) + floor)

    def _task_term(
        self,
        trainable: Params,
        buffers: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Task loss averaged over S points of the simplex (the point itself for a mode)."""
        vertices = [*self.vertices, trainable]
        alphas = sample_dirichlet(
            len(vertices), self.samples if len(vertices) > 1 else 1, generator
        )
        losses = []
        for a in alphas:
            with self._precision(x.device):
                outputs = functional_call(self.model, (mix_vertices(vertices, a), buffers), x)
            losses.append(task_loss(self.task, outputs.float(), y))
        return torch.stack(losses).mean()

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    @torch.no_grad()
    def _validation_loss(self, params: Params, buffers: Params, stopping: EarlyStopping) -> float:
        """Mean task loss of the weights ``params`` on the held-out split, in eval mode."""
        self.model.eval()
        total, count = 0.0, 0
        for x, y in stopping.val.labelled(stopping.batch_size):
            with self._precision(x.device):
                outputs = functional_call(self.model, (params, buffers), x)
            total += float(task_loss(self.task, outputs.float(), y)) * len(y)
            count += len(y)
        self.model.train()
        return total / count

    def _train(
        self,
        start: Mapping[str, torch.Tensor],
        data: Batches,
        optim: OptimSettings,
        generator: torch.Generator,
        desc: str,
        stopping: EarlyStopping | None = None,
    ) -> VertexHistory:
        trainable = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        optimiser = torch.optim.SGD(
            trainable.values(),
            lr=optim.lr,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
        )
        steps_per_epoch = -(-len(data) // optim.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=optim.epochs * steps_per_epoch
        )
        is_mode = not self.vertices
        # A mode's BatchNorm statistics are its own; a new vertex must not disturb them.
        buffers = self.buffers if is_mode else {k: v.clone() for k, v in self.buffers.items()}
        floor = 0.0 if is_mode else self.eps * squared_norm(self.vertices[0])
        history = VertexHistory()
        # A mode's step is one pass per example; a SPRO step one per example and sample.
        passes_per_example = 1 if is_mode else self.samples
        best: tuple[float, int, Params, Params] | None = None  # loss, epoch, weights, buffers
        self.model.train()
        # Quiet unless stderr is a terminal (disable=None); the rate is in examples per second.
        with tqdm(
            total=optim.epochs * len(data),
            desc=desc,
            unit="ex",
            unit_scale=True,
            leave=False,
            disable=None,
        ) as bar:
            for epoch in range(optim.epochs):
                losses, volumes = [], []
                for xb, yb in data.batches(optim.batch_size, generator):
                    loss = self._task_term(trainable, buffers, xb, yb, generator)
                    objective = loss
                    if not is_mode:
                        volume = self._volume_term(trainable, floor)
                        objective = loss - self.lam * volume
                        volumes.append(volume.item())
                    optimiser.zero_grad(set_to_none=True)
                    objective.backward()
                    optimiser.step()
                    schedule.step()
                    losses.append(loss.item())
                    history.passes += passes_per_example * len(yb)
                    bar.update(len(yb))
                history.loss.append(sum(losses) / len(losses))
                if volumes:
                    history.log_height.append(sum(volumes) / len(volumes))
                bar.set_postfix(epoch=f"{epoch + 1}/{optim.epochs}", loss=f"{history.loss[-1]:.4f}")
                if stopping is None:
                    continue
                history.val_loss.append(self._validation_loss(trainable, buffers, stopping))
                history.forward += len(stopping.val)
                if best is None or history.val_loss[-1] < best[0]:
                    best = (history.val_loss[-1], epoch + 1, _copy(trainable), _copy(buffers))
                elif epoch + 1 - best[1] >= stopping.patience:
                    break
        if best is not None:
            _, history.best_epoch, trainable, best_buffers = best
            self.buffers.update(best_buffers)
        self.vertices.append({k: v.detach() for k, v in trainable.items()})
        return history


def _copy(tensors: Params) -> Params:
    return {k: v.detach().clone() for k, v in tensors.items()}
