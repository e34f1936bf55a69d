"""Choose the volume weight λ on the validation split.

Too small a λ leaves every draw next to its mode (the ensemble predicts like the mode); too
large a λ pushes the vertices into high loss. The search grows the simplex of the first
``search.modes`` modes for every λ of a log grid, draws members as the final bundle will, and
scores each λ by the validation NLL of the pooled members after temperature (or variance)
scaling. Its cost is bounded by ``len(grid) × modes`` simplexes, and the simplexes grown for
the chosen λ are reused by the training that follows (they live in the checkpoints).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from serving.engine.reference import ReferenceEngine
from serving.manifest import InputSpec
from training.espro import ComplexTrainer, draw_members, member_states
from training.evaluation import fit_scale, score
from training.splits import Split, split_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LambdaSearch:
    """What the search tried and what it cost."""

    grid: list[float]
    scores: list[float]
    """Validation NLL after scaling, one per grid value."""
    best: float
    seconds: float
    """Wall-clock time of the search, the training of its simplexes included."""
    vertex_epochs: int
    """Epochs of vertex training the search spent (each over S draws per batch)."""
    warning: str | None = None
    """Set when the best λ is an end of the grid: the optimum may lie beyond it."""

    def as_dict(self) -> dict:
        return asdict(self)


def search_lambda(trainer: ComplexTrainer, val: Split, input_spec: InputSpec) -> LambdaSearch:
    """Score every λ of the config's ``simplex.search.grid`` on the raw validation split."""
    config, task = trainer.config, trainer.task
    search = config.simplex.search
    modes = min(search.modes, config.modes.count)
    started = time.perf_counter()
    scores = []
    for lam, simplexes in zip(search.grid, trainer.train_grid(search.grid, modes), strict=True):
        model = trainer.make_model()
        draws = draw_members(config, model, simplexes, trainer.data)
        engine = ReferenceEngine(
            model, member_states(simplexes, draws), input_spec, device=trainer.data.device
        )
        outputs = split_outputs(engine.outputs, val).cpu()
        scores.append(score(task, outputs, val.y, fit_scale(task, outputs, val.y))["nll"])
        log.info("λ = %g: validation NLL %.4f", lam, scores[-1])
    best = search.grid[min(range(len(scores)), key=scores.__getitem__)]
    vertex_epochs = len(search.grid) * modes * config.simplex.vertices * config.simplex.epochs
    warning = None
    if best in (min(search.grid), max(search.grid)):
        side = "smallest" if best == min(search.grid) else "largest"
        warning = f"the best λ ({best:g}) is the {side} of the grid: widen simplex.search.grid"
        log.warning("λ search: %s", warning)
    return LambdaSearch(
        grid=list(search.grid),
        scores=scores,
        best=best,
        seconds=time.perf_counter() - started,
        vertex_epochs=vertex_epochs,
        warning=warning,
    )
