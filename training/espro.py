"""ESPRO: M independent modes, a k-simplex grown at each, members drawn from every simplex.

With ``k = 0`` the same code trains a deep ensemble of M members, and with ``M = 1`` a single
model. Every random choice (initialisation, shuffling, Dirichlet draws, dropout) comes from a
seed derived from the run's seed and the position of the vertex, so a run resumed from its
checkpoints gives the same weights as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from serving.manifest import DrawSpec, SimplexSpec, Task
from serving.simplex import mix_vertices, sample_dirichlet
from training.batchnorm import batchnorm_buffer_names, recompute_batchnorm
from training.checkpoint import Checkpoints, SavedVertex
from training.config import TrainConfig
from training.cost import Cost, VertexRecord
from training.errors import ConfigError
from training.splits import TrainingData
from training.spro import EarlyStopping, LabelledBatches, Params, SimplexTrainer
from training.volume import log_volume

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Runner(Protocol):
    """Runs independent calls, possibly at once; results come back in order."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]: ...


class SequentialRunner:
    """One call after another, in this process."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return [fn(item) for item in items]


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for one purpose of one run, stable across Python processes."""
    text = ":".join(map(str, (seed, *keys))).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


@dataclass
class TrainedSimplex:
    """One mode and the vertices grown at it."""

    vertices: list[Params]
    buffers: Params
    records: list[VertexRecord]
    """How the training of each vertex ended and what it cost, the mode first."""

    @property
    def costs(self) -> list[Cost]:
        return [r.cost for r in self.records]

    @property
    def log_volume(self) -> float | None:
        """log V² of the simplex, ``None`` for a lone mode or a degenerate simplex."""
        if len(self.vertices) < 2:
            return None
        value = float(log_volume(self.vertices))
        return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Draw:
    """A point of a simplex, with BatchNorm statistics of its own if the model has any."""

    alpha: tuple[float, ...]
    batchnorm: Params
    cost: Cost = field(default_factory=Cost)
    """The forward passes and seconds its BatchNorm recomputation took."""


def load_state_dict_file(path: str, model: nn.Module) -> Params:
    """Parameters of ``model`` from a safetensors ``state_dict``, checked against its names."""
    state = load_file(path)
    names = dict(model.named_parameters())
    missing = sorted(set(names) - set(state))
    if missing:
        raise ValueError(f"{path} lacks parameters {missing[:5]} of the model")
    for name, param in names.items():
        if state[name].shape != param.shape:
            raise ValueError(
                f"{path}: {name} has shape {list(state[name].shape)}, "
                f"the model expects {list(param.shape)}"
            )
    return {name: state[name].to(param.device, param.dtype) for name, param in names.items()}


def _digest(config: TrainConfig, exclude: dict[str, Any]) -> str:
    relevant = config.model_dump(
        mode="json",
        include={"seed", "precision", "data", "model", "modes", "simplex"},
        exclude={"data": {"num_workers"}, **exclude},
        by_alias=True,
    )
    return hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()[:16]


def mode_digest(config: TrainConfig) -> str:
    """Digest of the settings a mode depends on: not the number of modes (mode m's seed is
    its own), nor the simplex grown at it, nor the processes that read the data."""
    return _digest(config, {"modes": {"count"}, "simplex": True})


def vertex_digest(config: TrainConfig) -> str:
    """Digest of the settings an added vertex depends on besides λ: its mode's and SPRO's,
    not the order of the simplex (vertex j never sees the vertices after it)."""
    return _digest(config, {"modes": {"count"}, "simplex": {"vertices", "lam", "search"}})


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype of the config's mixed precision on ``device`` (``None``: float32)."""
    if config.precision == "fp32":
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"precision: {config.precision} needs autocast, which {device} lacks")
    return torch.bfloat16


@dataclass(frozen=True)
class ComplexTrainer:
    """Trains the modes and grows their simplexes on the training ``data``.

    ``make_model`` builds the architecture on ``data.device``. Every finished vertex goes
    to ``checkpoints``; a mode does not depend on λ, so simplexes grown with several values of
    λ (the search) share their mode, and a simplex grown once for a λ is loaded thereafter.
    With ``modes.patience`` set, modes stop early on the loss of the held-out ``val``.

    Simplexes are independent, so ``runner`` may grow them at once (Ray tasks, see
    :mod:`training.distributed`): first every mode, then every simplex from its saved mode.
    Seeds depend only on the position of a vertex, so the weights are the same either way.
    """

    config: TrainConfig
    make_model: Callable[[], nn.Module]
    task: Task
    data: TrainingData
    checkpoints: Checkpoints
    runner: Runner = field(default_factory=SequentialRunner)
    val: LabelledBatches | None = None

    def __post_init__(self) -> None:
        if self.config.modes.patience is not None and self.val is None:
            raise ConfigError("modes.patience: early stopping needs a validation split")

    def train(self, lam: float, modes: int | None = None) -> list[TrainedSimplex]:
        """The first ``modes`` simplexes (all by default) grown with volume weight ``lam``."""
        return self.train_grid([lam], modes)[0]

    def train_grid(
        self, lams: Sequence[float], modes: int | None = None
    ) -> list[list[TrainedSimplex]]:
        """For every λ of ``lams``, the first ``modes`` simplexes grown with it."""
        count = self.config.modes.count if modes is None else modes
        if not isinstance(self.runner, SequentialRunner):
            self.runner.map(self._mode, range(count))  # shared by every λ: train each once
        jobs = [(m, lam) for lam in lams for m in range(count)]
        simplexes = self.runner.map(self._simplex, jobs)
        return [simplexes[i * count : (i + 1) * count] for i in range(len(lams))]

    def _mode(self, m: int) -> None:
        self.simplex(m, 0.0, vertices=0)

    def _simplex(self, job: tuple[int, float]) -> TrainedSimplex:
        return self.simplex(*job)

    def simplex(self, m: int, lam: float, *, vertices: int | None = None) -> TrainedSimplex:
        """Train mode ``m`` (or load it) and grow its simplex, one vertex at a time, up to
        ``vertices`` added vertices (the config's number by default)."""
        config = self.config
        torch.manual_seed(derive_seed(config.seed, "init", m))
        model = self.make_model()
        init = (
            load_state_dict_file(str(config.modes.init[m]), model)
            if m < len(config.modes.init)
            else None
        )
        trainer = SimplexTrainer(
            model,
            self.task,
            lam=lam,
            samples=config.simplex.samples,
            eps=config.simplex.eps,
            autocast=autocast_dtype(config, self.data.device),
        )
        records = []
        for j in range(1 + (config.simplex.vertices if vertices is None else vertices)):
            digest = mode_digest(config) if j == 0 else vertex_digest(config)
            key = (digest, m, j, None if j == 0 else lam)
            saved = self.checkpoints.load(*key, device=self.data.device)
            if saved is None:
                saved = self._train_vertex(trainer, m, j, init)
                self.checkpoints.save(*key, saved)
            else:
                log.info("mode %d vertex %d: loaded from checkpoint", m, j)
            trainer.vertices.append(saved.params)
            if j == 0:
                trainer.buffers = dict(saved.buffers)
            records.append(saved.record)
        return TrainedSimplex(trainer.vertices, trainer.buffers, records)

    def _train_vertex(
        self, trainer: SimplexTrainer, m: int, j: int, init: Params | None
    ) -> SavedVertex:
        config, data = self.config, self.data
        torch.manual_seed(derive_seed(config.seed, "vertex", m, j))
        rng = generator(config.seed, "batches", m, j)
        start = time.perf_counter()
        if j == 0:
            desc = f"mode {m + 1}/{config.modes.count}"
            stopping = None
            if config.modes.patience is not None and self.val is not None:
                stopping = EarlyStopping(self.val, config.modes.patience)
            history = trainer.fit_mode(
                data, config.modes.settings(), rng, init=init, stopping=stopping, desc=desc
            )
        else:
            desc = f"mode {m + 1} vertex {j} λ={trainer.lam:g}"
            history = trainer.add_vertex(data, config.simplex.settings(), rng, desc=desc)
        seconds = time.perf_counter() - start
        params = trainer.vertices.pop()
        log.info("mode %d vertex %d: loss %.4f in %.1f s", m, j, history.loss[-1], seconds)
        if history.best_epoch is not None:
            log.info(
                "mode %d: best validation loss %.4f at epoch %d of %d",
                m,
                min(history.val_loss),
                history.best_epoch,
                history.epochs,
            )
        cost = Cost(history.passes, history.forward, seconds)
        return SavedVertex(
            params=params,
            buffers=trainer.buffers if j == 0 else {},
            record=VertexRecord(cost, history.epochs, history.loss[-1]),
        )


def draw_members(
    config: TrainConfig,
    model: nn.Module,
    simplexes: Sequence[TrainedSimplex],
    data: TrainingData,
) -> list[list[Draw]]:
    """Draw ``draws.per_simplex`` members from every simplex, recomputing BatchNorm for each
    on the first ``draws.batchnorm_batches`` training batches (in order, not augmented).

    Each simplex's draws come from their own seeded generator (recorded as ``draw_seed``).
    """
    bn_names = batchnorm_buffer_names(model)
    draws = []
    for m, simplex in enumerate(simplexes):
        # A lone mode is a single point: one member, however many draws are asked for.
        count = config.draws.per_simplex if len(simplex.vertices) > 1 else 1
        alphas = sample_dirichlet(len(simplex.vertices), count, generator(config.seed, "draws", m))
        draws.append([])
        for alpha in alphas:
            batchnorm: Params = {}
            cost = Cost()
            if bn_names:
                start = time.perf_counter()
                sizes: list[int] = []
                batches = itertools.islice(
                    data.in_order(config.modes.batch_size), config.draws.batchnorm_batches
                )
                fresh = recompute_batchnorm(
                    model,
                    mix_vertices(simplex.vertices, alpha),
                    simplex.buffers,
                    _counted(batches, sizes),
                )
                batchnorm = {n: fresh[n] for n in bn_names}
                cost = Cost(forward=sum(sizes), seconds=time.perf_counter() - start)
            draws[m].append(Draw(tuple(alpha.tolist()), batchnorm, cost))
    return draws


def _counted(batches: Iterable[torch.Tensor], sizes: list[int]) -> Iterator[torch.Tensor]:
    """``batches``, appending each one's length to ``sizes`` as it is read."""
    for x in batches:
        sizes.append(len(x))
        yield x


def member_states(
    simplexes: Sequence[TrainedSimplex], draws: Sequence[Sequence[Draw]]
) -> list[Params]:
    """Parameters and buffers of every drawn member, simplex by simplex."""
    return [
        {**mix_vertices(simplex.vertices, d.alpha), **simplex.buffers, **d.batchnorm}
        for simplex, own in zip(simplexes, draws, strict=True)
        for d in own
    ]


def simplex_specs(
    config: TrainConfig, simplexes: Sequence[TrainedSimplex], draws: Sequence[Sequence[Draw]]
) -> tuple[SimplexSpec, ...]:
    """The manifest's description of every simplex and its draws."""
    return tuple(
        SimplexSpec(
            num_vertices=len(simplex.vertices),
            draw_seed=derive_seed(config.seed, "draws", m),
            draws=tuple(DrawSpec(alpha=d.alpha, batchnorm=bool(d.batchnorm)) for d in own),
            log_volume=simplex.log_volume,
        )
        for m, (simplex, own) in enumerate(zip(simplexes, draws, strict=True))
    )
