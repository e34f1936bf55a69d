"""Functional diversity within one simplex: a 3-simplex (tetrahedron) grown at one mode of an
MLP on two spirals; decision regions of several draws and of their ensemble (paper Figure 7)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from serving.predictive import pool
from training.experiments.common import (
    draw,
    make_config,
    member_outputs,
    per_member,
    setup,
    train_simplexes,
)
from training.experiments.report import Context, pyplot, table
from training.metrics import accuracy
from training.volume import log_volume

TITLE = "Diversity: decision regions of draws from a 3-simplex on two spirals"
SHOWN = 5


def run(ctx: Context) -> dict[str, Any]:
    config = make_config(
        dataset="two_spirals",
        architecture="mlp",
        kwargs={"hidden": [64, 64, 64]},
        modes=1,
        mode_epochs=ctx.size(20, 300),
        mode_lr=0.05,
        vertices=3,
        vertex_epochs=ctx.size(5, 60),
        vertex_lr=0.02,
        lam=1.0,
        batch_size=64,
        weight_decay=0.0,
        seed=ctx.seed,
    )
    s = setup(config)
    with ctx.timed("training"):
        (simplex,) = train_simplexes(s)
    data = s.dataset
    members, alphas = draw(
        s, simplex.vertices, simplex.buffers, ctx.size(6, 20), ctx.seed, "diversity"
    )
    resolution = ctx.size(40, 200)
    extent = float(data.train.x.abs().max()) * 1.1
    axis = torch.linspace(-extent, extent, resolution)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    with ctx.timed("evaluation"):
        grid_probs = torch.softmax(member_outputs(s, members, grid), dim=-1)
        test_out = member_outputs(s, members, data.test.x)
        test_probs = torch.softmax(test_out, dim=-1)
        labels_grid = grid_probs.argmax(dim=-1)
        labels_test = test_probs.argmax(dim=-1)
        pairs = list(itertools.combinations(range(len(members)), 2))
        disagree_grid = [float((labels_grid[a] != labels_grid[b]).float().mean()) for a, b in pairs]
        disagree_test = [float((labels_test[a] != labels_test[b]).float().mean()) for a, b in pairs]
        own = per_member(s, members, data.train.x, data.train.y)
        test_own = per_member(s, members, data.test.x, data.test.y)
    results = {
        "log_volume": float(log_volume(simplex.vertices)),
        "alphas": alphas.tolist(),
        "draw_train_accuracy": own["accuracy"],
        "draw_test_accuracy": test_own["accuracy"],
        "ensemble_test_accuracy": accuracy(pool(test_probs), data.test.y),
        "mean_pairwise_disagreement_grid": float(np.mean(disagree_grid)),
        "mean_pairwise_disagreement_test": float(np.mean(disagree_test)),
        "grid_extent": extent,
    }
    plt = pyplot()
    shown = min(SHOWN, len(members))
    fig, axes = plt.subplots(1, shown + 1, figsize=(3.2 * (shown + 1), 3.2))
    x, y = data.train.x.numpy(), data.train.y.numpy()
    panels = [
        (grid_probs[i, :, 1], f"draw {i + 1}: test acc {test_own['accuracy'][i]:.3f}")
        for i in range(shown)
    ]
    panels.append(
        (
            pool(grid_probs)[:, 1],
            f"ensemble of {len(members)}: {results['ensemble_test_accuracy']:.3f}",
        )
    )
    for ax, (p1, title) in zip(axes, panels, strict=True):
        ax.contourf(
            axis,
            axis,
            p1.reshape(resolution, resolution).numpy(),
            levels=np.linspace(0, 1, 11),
            cmap="RdBu_r",
        )
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="bwr", s=3, edgecolors="none")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ctx.add(
        "One mode of a 3-hidden-layer MLP on two spirals, grown into a 3-simplex (4 vertices) "
        "by SPRO (λ = 1). Draws are uniform on the tetrahedron. Disagreement is the fraction "
        "of points where two draws predict different classes, averaged over pairs of draws."
    )
    ctx.figure(fig, "decision_regions", "P(arm 1) of several draws and of the ensemble.")
    ctx.add(
        table(
            ["quantity", "value"],
            [
                ["log V² of the simplex", results["log_volume"]],
                [
                    "draw train accuracy, min / mean",
                    f"{min(own['accuracy']):.3f} / {np.mean(own['accuracy']):.3f}",
                ],
                [
                    "draw test accuracy, min / mean",
                    f"{min(test_own['accuracy']):.3f} / {np.mean(test_own['accuracy']):.3f}",
                ],
                ["ensemble test accuracy", results["ensemble_test_accuracy"]],
                ["pairwise disagreement, grid", results["mean_pairwise_disagreement_grid"]],
                ["pairwise disagreement, test", results["mean_pairwise_disagreement_test"]],
            ],
        )
    )
    return results
