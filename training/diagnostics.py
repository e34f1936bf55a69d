"""The shape of each simplex: how large it is, how good its draws are, how much they differ.

A simplex is only worth its cost if its draws are both good and different from its mode.
:func:`diagnose` measures both and warns when a simplex is *degenerate* (its draws predict
like the mode: λ or the epochs per vertex too small) or *broken* (its draws are much worse
than the mode: λ too large).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from serving.engine.reference import ReferenceEngine
from serving.manifest import InputSpec, Task
from training.espro import Draw, TrainedSimplex, member_states
from training.splits import Split, split_outputs
from training.spro import task_loss
from training.volume import squared_distances, squared_norm

DEGENERATE_DISAGREEMENT = 0.005
"""Below this mean disagreement with the mode (classification), draws add nothing."""
DEGENERATE_SPREAD = 0.01
"""Regression: below this RMS difference of draw and mode means, in target stds."""
BROKEN_LOSS_RATIO = 1.5
"""Above this ratio of the worst draw's validation loss to the mode's, a simplex is broken."""


class SplitScores(BaseModel):
    """Loss (and accuracy, for classification) of the mode and of the draws on one split."""

    mode_loss: float
    draw_loss_mean: float
    draw_loss_worst: float
    mode_accuracy: float | None = None
    draw_accuracy_mean: float | None = None
    draw_accuracy_worst: float | None = None


class SimplexDiagnostics(BaseModel):
    """Size, quality and diversity of one simplex."""

    edge_lengths: list[float]
    """‖θ_i − θ_j‖ / ‖θ_0‖ for every pair of vertices (empty for a lone mode)."""
    log_volume: float | None
    train: SplitScores
    val: SplitScores
    diversity: float
    """Classification: mean fraction of validation inputs on which a draw's top class differs
    from the mode's. Regression: RMS difference of draw and mode means, in target stds."""
    warnings: list[str] = Field(default_factory=list)


def _scores(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> SplitScores:
    """Scores of member outputs ``[1 + D, N, ·]``: the mode first, then the D draws."""
    losses = [float(task_loss(task, o, targets)) for o in outputs]
    draw_losses = losses[1:] or losses
    loss = {
        "mode_loss": losses[0],
        "draw_loss_mean": sum(draw_losses) / len(draw_losses),
        "draw_loss_worst": max(draw_losses),
    }
    if task is Task.REGRESSION:
        return SplitScores(**loss)
    accuracies = [float((o.argmax(-1) == targets).double().mean()) for o in outputs]
    draw_accuracies = accuracies[1:] or accuracies
    return SplitScores(
        **loss,
        mode_accuracy=accuracies[0],
        draw_accuracy_mean=sum(draw_accuracies) / len(draw_accuracies),
        draw_accuracy_worst=min(draw_accuracies),
    )


def diagnose(
    task: Task,
    model: nn.Module,
    simplex: TrainedSimplex,
    draws: Sequence[Draw],
    train: Split,
    val: Split,
    input_spec: InputSpec,
) -> SimplexDiagnostics:
    """Measure one simplex on (a sample of) the training split and on the validation split."""
    mode = {**simplex.vertices[0], **simplex.buffers}
    device = next(iter(mode.values())).device
    members = [mode, *member_states([simplex], [list(draws)])]
    engine = ReferenceEngine(model, members, input_spec, device=device)
    train_out = split_outputs(engine.outputs, train).cpu()
    val_out = split_outputs(engine.outputs, val).cpu()
    norm = math.sqrt(squared_norm(simplex.vertices[0]))
    distances = squared_distances(simplex.vertices).sqrt()
    n = len(simplex.vertices)
    edges = [float(distances[i, j]) / norm for i in range(n) for j in range(i + 1, n)]
    if task is Task.CLASSIFICATION:
        labels = val_out.argmax(-1)
        diversity = float((labels[1:] != labels[0]).double().mean()) if len(draws) else 0.0
    else:
        spread = (val_out[1:, :, 0] - val_out[0, :, 0]).pow(2).mean().sqrt()
        diversity = float(spread / val.y.std().clamp_min(1e-12)) if len(draws) else 0.0
    result = SimplexDiagnostics(
        edge_lengths=edges,
        log_volume=simplex.log_volume,
        train=_scores(task, train_out, train.y),
        val=_scores(task, val_out, val.y),
        diversity=diversity,
    )
    return result.model_copy(update={"warnings": _warnings(task, result, n)})


def _warnings(task: Task, d: SimplexDiagnostics, num_vertices: int) -> list[str]:
    if num_vertices < 2:
        return []
    warnings = []
    floor = DEGENERATE_DISAGREEMENT if task is Task.CLASSIFICATION else DEGENERATE_SPREAD
    if d.diversity < floor:
        warnings.append(
            f"degenerate: the draws predict like the mode (diversity {d.diversity:.4f} < "
            f"{floor}); raise λ or the epochs per vertex"
        )
    if d.val.draw_loss_worst > BROKEN_LOSS_RATIO * d.val.mode_loss:
        warnings.append(
            f"broken: the worst draw's validation loss {d.val.draw_loss_worst:.4f} is over "
            f"{BROKEN_LOSS_RATIO}x the mode's {d.val.mode_loss:.4f}; lower λ"
        )
    return warnings


def diagnostics_table(diagnostics: Sequence[SimplexDiagnostics]) -> str:
    """A Markdown table of every simplex's size, quality and diversity."""
    lines = [
        "| simplex | max edge / ‖θ₀‖ | log V² | val loss mode / draws (worst) "
        "| val acc mode / draws (worst) | diversity | warnings |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, d in enumerate(diagnostics):
        edge = f"{max(d.edge_lengths):.4f}" if d.edge_lengths else "-"
        volume = f"{d.log_volume:.2f}" if d.log_volume is not None else "-"
        loss = f"{d.val.mode_loss:.4f} / {d.val.draw_loss_mean:.4f} ({d.val.draw_loss_worst:.4f})"
        accuracy = (
            f"{d.val.mode_accuracy:.4f} / {d.val.draw_accuracy_mean:.4f} "
            f"({d.val.draw_accuracy_worst:.4f})"
            if d.val.mode_accuracy is not None
            else "-"
        )
        warnings = "; ".join(d.warnings) or "-"
        lines.append(
            f"| {m} | {edge} | {volume} | {loss} | {accuracy} | {d.diversity:.4f} | {warnings} |"
        )
    return "\n".join(lines)
