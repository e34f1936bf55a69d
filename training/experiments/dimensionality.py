"""Dimensionality of a mode connecting volume: keep adding connecting vertices between two
modes and watch the volume and the train accuracy of draws (paper section 4.3, Figure 5)."""

from __future__ import annotations

import math
from typing import Any

from training.espro import generator
from training.experiments.common import draw, flatten, per_member
from training.experiments.connect import (
    complex_log_volume,
    new_vertex_heights,
    simplexes,
    train_connecting_vertex,
)
from training.experiments.report import Context, pyplot, table
from training.experiments.spro_complex import LAMBDA, base_setup
from training.spro import OptimSettings

TITLE = "Dimensionality: volume of a two-mode connecting complex against connecting vertices"
COLLAPSE_HEIGHT = 1e-3
"""A new vertex closer than this fraction of the mode distance to its face adds no volume."""
COLLAPSE_ACCURACY_DROP = 0.05
"""Draws more than this below the modes' train accuracy are not in a low-loss volume."""


def run(ctx: Context) -> dict[str, Any]:
    s, modes, buffers = base_setup(ctx, 2)
    n = ctx.size(200, 1000)
    xs, ys = s.dataset.train.x[:n], s.dataset.train.y[:n]
    mode_distance = float((flatten(modes[0]) - flatten(modes[1])).norm())
    states = [{**p, **b} for p, b in zip(modes, buffers, strict=True)]
    mode_acc = sum(per_member(s, states, xs, ys)["accuracy"]) / 2
    optim = OptimSettings(epochs=ctx.size(1, 4), lr=0.02, batch_size=ctx.size(64, 128))
    connecting: list = []
    steps = []
    collapsed_at = None
    for j in range(ctx.size(2, 8)):
        with ctx.timed("connecting vertices"):
            vertex, history = train_connecting_vertex(
                s.make_model(),
                s.task,
                modes,
                connecting,
                s.x_train,
                s.dataset.train.y,
                optim,
                generator(ctx.seed, "dimensionality", j),
                lam=LAMBDA,
                samples=3,
            )
        connecting.append(vertex)
        with ctx.timed("evaluation"):
            accs = []
            for i, vertices in enumerate(simplexes(modes, connecting)):
                members, _ = draw(s, vertices, buffers[i], ctx.size(2, 5), ctx.seed, "dim", j, i)
                accs += per_member(s, members, xs, ys)["accuracy"]
            heights = new_vertex_heights(modes, connecting)
            volume = complex_log_volume(modes, connecting)
        relative = min(heights) / mode_distance
        collapse = relative < COLLAPSE_HEIGHT or min(accs) < mode_acc - COLLAPSE_ACCURACY_DROP
        if collapse and collapsed_at is None:
            collapsed_at = j + 1
        steps.append(
            {
                "connecting_vertices": j + 1,
                "log_volume_complex": volume["complex"],
                "log_volume_simplexes": volume["simplexes"],
                "new_vertex_height": heights,
                "relative_height": relative,
                "draw_train_accuracy_mean": sum(accs) / len(accs),
                "draw_train_accuracy_min": min(accs),
                "final_loss": history.loss[-1],
                "seconds": history.seconds,
                "collapsed": collapse,
            }
        )
    results = {
        "lambda": LAMBDA,
        "mode_distance": mode_distance,
        "mode_train_accuracy": mode_acc,
        "steps": steps,
        "collapsed_at": collapsed_at,
    }
    _report(ctx, results)
    return results


def _report(ctx: Context, results: dict[str, Any]) -> None:
    plt = pyplot()
    steps = results["steps"]
    k = [st["connecting_vertices"] for st in steps]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(k, [st["log_volume_complex"] / math.log(10) for st in steps], marker="o")
    a1.set_xlabel("connecting vertices k")
    a1.set_ylabel("log10 volume of the complex")
    a2.plot(k, [st["draw_train_accuracy_mean"] for st in steps], marker="o", label="draws, mean")
    a2.plot(k, [st["draw_train_accuracy_min"] for st in steps], marker="x", label="draws, min")
    a2.axhline(results["mode_train_accuracy"], color="grey", ls="--", label="modes")
    a2.set_xlabel("connecting vertices k")
    a2.set_ylabel("train accuracy")
    a2.legend(fontsize=8)
    ctx.add(
        "Two independent modes of a small CNN on MNIST-1D are joined by k shared connecting "
        f"vertices (λ = {results['lambda']}), added one at a time. The complex is two "
        "k-simplexes; its volume is their sum. A step counts as a collapse when the new "
        f"vertex's height above its face is under {COLLAPSE_HEIGHT:g} of the mode distance "
        f"({results['mode_distance']:.2f}) or a draw's train accuracy falls more than "
        f"{COLLAPSE_ACCURACY_DROP} below the modes' ({results['mode_train_accuracy']:.3f})."
    )
    ctx.figure(fig, "volume", "Complex volume and train accuracy of draws against k.")
    rows = [
        [
            st["connecting_vertices"],
            st["log_volume_complex"] / math.log(10),
            st["relative_height"],
            st["draw_train_accuracy_mean"],
            st["draw_train_accuracy_min"],
            st["final_loss"],
            "yes" if st["collapsed"] else "no",
        ]
        for st in steps
    ]
    header = [
        "k",
        "log10 V",
        "new height / mode distance",
        "draw acc mean",
        "draw acc min",
        "train loss",
        "collapse",
    ]
    ctx.add(table(header, rows))
    at = results["collapsed_at"]
    ctx.add(
        f"First collapse at k = {at}."
        if at
        else f"No collapse up to k = {len(steps)}: the lower bound on the dimension here is "
        f"{len(steps)}, limited by the run's size, not by the loss surface."
    )
