"""Choose the volume weight λ on the validation split.

Too small a λ leaves every draw next to its mode (the ensemble predicts like the mode); too
large a λ pushes the vertices into high loss. The search grows the simplex of the first
``search.modes`` modes for every λ of a log grid, draws members as the final bundle will, and
scores each λ by the validation NLL of the pooled members after temperature (or variance)
scaling. A λ whose simplexes the diagnostics call *broken* (:mod:`training.diagnostics`) is
passed over: a low pooled NLL can hide draws far worse than their mode. The simplexes grown
for the chosen λ are reused by the training that follows (they live in the checkpoints).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from serving.engine.reference import ReferenceEngine
from serving.manifest import InputSpec
from training.cost import Cost, total
from training.diagnostics import diagnose
from training.espro import ComplexTrainer, Draw, TrainedSimplex, draw_members, member_states
from training.evaluation import fit_scale, score
from training.splits import Split, split_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LambdaSearch:
    """What the search tried, what it chose and what it cost."""

    grid: list[float]
    scores: list[float]
    """Validation NLL after scaling, one per grid value."""
    broken: list[bool]
    """Whether the diagnostics called any simplex grown with that value broken."""
    best: float
    cost: Cost
    """What the search spent beyond the simplexes of the chosen λ: the vertices of every
    other λ, and the draws, diagnostics and scoring of all."""
    warnings: list[str]

    def as_dict(self) -> dict:
        return {**asdict(self), "cost": self.cost.as_dict()}


def validation_nll(
    trainer: ComplexTrainer,
    simplexes: list[TrainedSimplex],
    val: Split,
    input_spec: InputSpec,
) -> tuple[float, list[list[Draw]], Cost]:
    """The validation NLL, after scaling, of the members drawn from ``simplexes`` as the
    bundle would draw them; the draws; and what drawing and scoring cost."""
    started = time.perf_counter()
    model = trainer.make_model()
    draws = draw_members(trainer.config, model, simplexes, trainer.data)
    engine = ReferenceEngine(
        model, member_states(simplexes, draws), input_spec, device=trainer.data.device
    )
    outputs = split_outputs(engine.outputs, val).cpu()
    nll = score(trainer.task, outputs, val.y, fit_scale(trainer.task, outputs, val.y))["nll"]
    forward = sum(len(own) for own in draws) * len(val)
    forward += sum(d.cost.forward for own in draws for d in own)  # BatchNorm recomputation
    return nll, draws, Cost(forward=forward, seconds=time.perf_counter() - started)


def _added_vertices(simplexes: list[TrainedSimplex]) -> Cost:
    return total(c for s in simplexes for c in s.costs[1:])


def search_lambda(
    trainer: ComplexTrainer, val: Split, sample: Split, input_spec: InputSpec
) -> LambdaSearch:
    """Score every λ of the config's ``simplex.search.grid`` on the raw validation split;
    ``sample`` (training inputs) feeds the diagnostics."""
    config, task = trainer.config, trainer.task
    search = config.simplex.search
    modes = min(search.modes, config.modes.count)
    grown = trainer.train_grid(search.grid, modes)
    scores, broken, scoring = [], [], Cost()
    for lam, simplexes in zip(search.grid, grown, strict=True):
        nll, draws, cost = validation_nll(trainer, simplexes, val, input_spec)
        started = time.perf_counter()
        model = trainer.make_model()
        diagnostics = [
            diagnose(task, model, simplex, own, sample, val, input_spec)
            for simplex, own in zip(simplexes, draws, strict=True)
        ]
        scores.append(nll)
        broken.append(any(w.startswith("broken") for d in diagnostics for w in d.warnings))
        forward = sum((1 + len(own)) * (len(sample) + len(val)) for own in draws)
        scoring += cost + Cost(forward=forward, seconds=time.perf_counter() - started)
        log.info(
            "λ = %g: validation NLL %.4f%s", lam, scores[-1], " (broken)" if broken[-1] else ""
        )
    best, warnings = _choose(search.grid, scores, broken)
    for warning in warnings:
        log.warning("λ search: %s", warning)
    others = total(
        _added_vertices(s) for lam, s in zip(search.grid, grown, strict=True) if lam != best
    )
    return LambdaSearch(
        grid=list(search.grid),
        scores=scores,
        broken=broken,
        best=best,
        cost=others + scoring,
        warnings=warnings,
    )


def _choose(grid: list[float], scores: list[float], broken: list[bool]) -> tuple[float, list[str]]:
    """The best-scoring λ that breaks no simplex (the best of all, with a warning, if every
    one does), and warnings when the choice may lie beyond the grid."""
    warnings = []
    allowed = [i for i in range(len(grid)) if not broken[i]]
    if not allowed:
        allowed = list(range(len(grid)))
        warnings.append(
            "every λ of the grid broke a simplex: chose the best anyway; lower the grid "
            "or the vertex learning rate"
        )
    best = grid[min(allowed, key=scores.__getitem__)]
    if best in (min(grid), max(grid)):
        side = "smallest" if best == min(grid) else "largest"
        warnings.append(
            f"the best λ ({best:g}) is the {side} of the grid: widen simplex.search.grid"
        )
    return best, warnings
