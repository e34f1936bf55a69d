"""Spend a training budget as the validation split says is best: more modes, or simplexes.

For a budget of B forward-backward passes (:mod:`training.cost`) every order k from 0 (a deep
ensemble) to ``simplex.vertices``, at every number of epochs per vertex tried, gets a plan: as
many modes M_k as fit once each mode's k vertices, and the λ search when λ is left out, are
paid for. The plans share their work: mode m
is the same in every plan, and vertex j of a simplex is the same at every order above j (the
checkpoints are keyed so), so trying all orders costs little more than the largest plan.
Each plan's pooled members are scored on the validation split after temperature scaling, and
the best plan is what ``espro train`` ships; a deep ensemble wins when it scores best.

λ is searched once, on 1-simplexes: the volume term weighs the log-height of every new vertex
alike (:mod:`training.spro`), so the λ of the first vertex serves every order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from serving.manifest import InputSpec
from training.config import TrainConfig
from training.cost import Cost, total
from training.errors import ConfigError
from training.espro import ComplexTrainer
from training.search import LambdaSearch, search_lambda, validation_nll
from training.splits import Split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """``modes`` modes with a simplex of order ``order`` at each (0: a deep ensemble), each
    added vertex trained ``vertex_epochs`` epochs."""

    modes: int
    order: int
    vertex_epochs: int
    passes: int
    """Planned forward-backward passes, the λ search included."""


def plans(config: TrainConfig, budget: int, train_size: int) -> list[Plan]:
    """One plan per order and epochs per vertex that fits at least one mode into ``budget``."""
    simplex = config.simplex
    mode = config.modes.epochs * train_size
    searched = simplex.lam is None
    # The search grows the first vertex at every mode searched for every λ of the grid; a plan
    # whose vertices train as long as the search's reuses those of the chosen λ.
    searched_vertices = len(simplex.search.grid) * simplex.search.modes
    search_vertex = simplex.epochs * simplex.samples * train_size
    epochs_tried = sorted({simplex.epochs, *(config.budget.vertex_epochs if config.budget else [])})
    shapes = [(0, simplex.epochs)] + [
        (order, epochs) for order in range(1, simplex.vertices + 1) for epochs in epochs_tried
    ]
    result = []
    for order, epochs in shapes:
        vertex = epochs * simplex.samples * train_size
        reused = simplex.search.modes if epochs == simplex.epochs else 0
        fixed = (searched_vertices - reused) * search_vertex if order and searched else 0
        count = (budget - fixed) // (mode + order * vertex)
        if count >= 1:
            result.append(Plan(count, order, epochs, fixed + count * (mode + order * vertex)))
    if not result:
        raise ConfigError(
            f"budget: {budget:,} passes do not train one mode of {mode:,} "
            f"({config.modes.epochs} epochs over {train_size:,} examples)"
        )
    return result


def budget_passes(config: TrainConfig, train_size: int, passes_per_second: float) -> int:
    """The config's budget in forward-backward passes."""
    budget = config.budget
    assert budget is not None
    if budget.mode_epochs is not None:
        return math.floor(budget.mode_epochs * train_size)
    assert budget.seconds is not None
    return math.floor(budget.seconds * passes_per_second)


@dataclass(frozen=True)
class Selection:
    """The config that spends the budget best, and how it was chosen."""

    config: TrainConfig
    record: dict[str, Any]
    """The budget in passes, every plan with its validation NLL, and the chosen one."""
    search: LambdaSearch | None
    cost: Cost
    """What was trained and scored beyond the chosen plan and the λ search."""


def select(trainer: ComplexTrainer, val: Split, sample: Split, input_spec: InputSpec) -> Selection:
    """Try every plan of ``trainer.config.budget`` and choose on the validation split."""
    config = trainer.config
    train_size = len(trainer.data)
    first = trainer.simplex(0, 0.0, vertices=0).records[0].cost
    budget = budget_passes(config, train_size, first.passes / max(first.seconds, 1e-9))
    candidates = plans(config, budget, train_size)
    lam, search, spent = config.simplex.lam, None, Cost()
    if lam is None and any(p.order for p in candidates):
        one = dataclasses.replace(trainer, config=_with(config, vertices=1))
        search = search_lambda(one, val, sample, input_spec)
        lam = search.best
    scores, trained = [], []
    for plan in candidates:
        chosen = _planned(config, plan, lam or 0.0)
        simplexes = dataclasses.replace(trainer, config=chosen).train(lam or 0.0)
        nll, _, scoring = validation_nll(trainer, simplexes, val, input_spec)
        scores.append(nll)
        # A vertex is the same in every plan that trains it as long: mode m's, vertex j's.
        trained.append(
            {
                (m, j, plan.vertex_epochs if j else None): c
                for m, s in enumerate(simplexes)
                for j, c in enumerate(s.costs)
            }
        )
        spent += scoring
        log.info(
            "budget: %d modes × order %d, %d epochs per vertex (%s passes): validation NLL %.4f",
            plan.modes,
            plan.order,
            plan.vertex_epochs,
            f"{plan.passes:,}",
            nll,
        )
    best = min(range(len(candidates)), key=scores.__getitem__)
    # Every vertex trained for some plan but not shipped was spent on the choice.
    shipped = trained[best]
    others = {key: cost for plan in trained for key, cost in plan.items() if key not in shipped}
    spent += total(others.values())
    plan = candidates[best]
    log.info(
        "budget: chose %d modes × order %d, %d epochs per vertex",
        plan.modes,
        plan.order,
        plan.vertex_epochs,
    )
    record = {
        "passes": budget,
        "plans": [
            dataclasses.asdict(p) | {"val_nll": nll}
            for p, nll in zip(candidates, scores, strict=True)
        ],
        "chosen": best,
    }
    return Selection(_planned(config, plan, lam), record, search, spent)


def _with(
    config: TrainConfig,
    *,
    modes: int | None = None,
    vertices: int | None = None,
    lam: float | None = None,
    vertex_epochs: int | None = None,
) -> TrainConfig:
    """``config`` with another number of modes, order, λ or epochs per vertex (valid values
    by construction)."""
    simplex = config.simplex
    changes = {
        "vertices": vertices if vertices is not None else simplex.vertices,
        "lam": lam if lam is not None else simplex.lam,
        "epochs": vertex_epochs if vertex_epochs is not None else simplex.epochs,
    }
    return config.model_copy(
        update={
            "modes": config.modes.model_copy(update={"count": modes or config.modes.count}),
            "simplex": simplex.model_copy(update=changes),
        }
    )


def _planned(config: TrainConfig, plan: Plan, lam: float | None) -> TrainConfig:
    return _with(
        config, modes=plan.modes, vertices=plan.order, lam=lam, vertex_epochs=plan.vertex_epochs
    )
