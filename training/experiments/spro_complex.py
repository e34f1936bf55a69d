"""Mode connecting simplicial complexes: 2 and 3 independently trained modes joined through
shared connecting vertices (paper section 4.2, Figures 3 and 4)."""

from __future__ import annotations

from typing import Any

import torch

from serving.predictive import pool
from training.espro import generator
from training.experiments.common import (
    draw,
    loss_plane,
    make_config,
    member_outputs,
    per_member,
    plot_plane,
    setup,
    train_simplexes,
    with_batchnorm,
)
from training.experiments.connect import complex_log_volume, simplexes, train_connecting_vertex
from training.experiments.report import Context, pyplot, table
from training.metrics import accuracy
from training.spro import OptimSettings

TITLE = "SPRO mode connecting simplicial complexes on MNIST-1D"
LAMBDA = 0.1


def base_setup(ctx: Context, modes: int) -> tuple[Any, list, list]:
    """MNIST-1D, a small CNN, and ``modes`` independently trained modes: their parameters
    and their buffers."""
    config = make_config(
        dataset="mnist1d",
        architecture="cnn",
        kwargs={"channels": [16, 32], "hidden": 64},
        data_options={"n_samples": 400} if ctx.quick else {},
        modes=modes,
        mode_epochs=ctx.size(2, 30),
        vertices=0,
        batch_size=ctx.size(64, 128),
        seed=ctx.seed,
    )
    s = setup(config)
    with ctx.timed("modes"):
        trained = train_simplexes(s)
    return s, [dict(t.vertices[0]) for t in trained], [t.buffers for t in trained]


def connect(ctx: Context, s: Any, modes: list, count: int, tag: str) -> tuple[list, list]:
    """Train ``count`` connecting vertices shared by the simplexes of ``modes``."""
    optim = OptimSettings(epochs=ctx.size(1, 6), lr=0.02, batch_size=ctx.size(64, 128))
    connecting, histories = [], []
    for j in range(count):
        torch.manual_seed(0)
        vertex, history = train_connecting_vertex(
            s.make_model(),
            s.task,
            modes,
            connecting,
            s.x_train,
            s.dataset.train.y,
            optim,
            generator(ctx.seed, "connect", tag, j),
            lam=LAMBDA,
            samples=3,
        )
        connecting.append(vertex)
        histories.append({"loss": history.loss, "seconds": history.seconds})
    return connecting, histories


def draw_scores(
    ctx: Context, s: Any, modes: list, buffers: list, connecting: list, tag: str
) -> dict[str, Any]:
    """Per-draw train/test loss and accuracy from every simplex (each with its mode's
    buffers), and the pooled ensemble."""
    data = s.dataset
    n = ctx.size(200, 1000)
    xs, ys = data.train.x[:n], data.train.y[:n]
    per_simplex, pooled = [], []
    for i, vertices in enumerate(simplexes(modes, connecting)):
        members, _ = draw(s, vertices, buffers[i], ctx.size(3, 10), ctx.seed, tag, i)
        train = per_member(s, members, xs, ys)
        test = per_member(s, members, data.test.x, data.test.y)
        per_simplex.append({"train": train, "test": test})
        pooled.append(member_outputs(s, members, data.test.x))
    probs = pool(torch.softmax(torch.cat(pooled), dim=-1))
    states = [{**p, **b} for p, b in zip(modes, buffers, strict=True)]
    mode_scores = per_member(s, states, xs, ys)
    midpoints = [
        {k: (a[k] + b[k]) / 2 for k in a} for i, a in enumerate(modes) for b in modes[i + 1 :]
    ]
    return {
        "simplexes": per_simplex,
        "ensemble_test_accuracy": accuracy(probs, data.test.y),
        "modes_train": mode_scores,
        "mode_midpoints_train": per_member(s, with_batchnorm(s, midpoints, buffers[0]), xs, ys),
    }


def run(ctx: Context) -> dict[str, Any]:
    s, all_modes, all_buffers = base_setup(ctx, 3)
    n = ctx.size(200, 1000)
    xs, ys = s.dataset.train.x[:n], s.dataset.train.y[:n]
    resolution = ctx.size(5, 25)
    plt = pyplot()
    results: dict[str, Any] = {"lambda": LAMBDA, "complexes": {}}
    panels = []
    for modes_count in (2, 3):
        tag = f"{modes_count} modes"
        modes, buffers = all_modes[:modes_count], all_buffers[:modes_count]
        with ctx.timed(f"{tag}: connecting vertices"):
            connecting, histories = connect(ctx, s, modes, ctx.size(1, 2), tag)
        with ctx.timed(f"{tag}: evaluation"):
            entry = {
                "connecting_vertices": len(connecting),
                "training": histories,
                "log_volume": complex_log_volume(modes, connecting),
                **draw_scores(ctx, s, modes, buffers, connecting, tag),
            }
            names = [f"w{i + 1}" for i in range(modes_count)]
            names += [f"θ{j + 1}" for j in range(len(connecting))]
            params = dict(zip(names, [*modes, *connecting], strict=True))
            choices = (
                [("w1", "w2", "θ1"), ("w1", "θ1", names[-1])]
                if modes_count == 2
                else [("w1", "w2", "w3"), ("w2", "θ1", names[-1])]
            )
            entry["planes"] = {}
            for choice in choices:
                if len(set(choice)) < 3:
                    continue
                points = [params[c] for c in choice]
                plane = loss_plane(s, points, buffers[0], xs, ys, resolution=resolution)
                entry["planes"]["-".join(choice)] = plane
                panels.append((plane, choice, f"{tag}: plane through {', '.join(choice)}"))
        results["complexes"][tag] = entry
    with ctx.timed("figures"):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for ax, (plane, choice, title) in zip(axes[0], panels, strict=True):
            image = plot_plane(ax, plane, choice, title)
            fig.colorbar(image, ax=ax, label="log10 train loss")
    _report(ctx, results, fig)
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _report(ctx: Context, results: dict[str, Any], fig: Any) -> None:
    ctx.add(
        "Modes w_i are independent SGD solutions of a small CNN. The complex holds one simplex "
        "[w_i, θ_1, …, θ_k] per mode; the connecting vertices θ_j are shared and trained one "
        f"at a time (λ = {results['lambda']}) on the expected loss over all the simplexes "
        "(`training/experiments/connect.py`). Train scores are on the first training "
        "examples; each simplex's draws are uniform."
    )
    rows = []
    for tag, entry in results["complexes"].items():
        for i, sc in enumerate(entry["simplexes"]):
            rows.append(
                [
                    tag,
                    f"w{i + 1} + {entry['connecting_vertices']} θ",
                    _mean(sc["train"]["loss"]),
                    max(sc["train"]["loss"]),
                    _mean(sc["train"]["accuracy"]),
                    min(sc["train"]["accuracy"]),
                    _mean(sc["test"]["accuracy"]),
                    entry["log_volume"]["simplexes"][i],
                ]
            )
    header = [
        "complex",
        "simplex",
        "train loss mean",
        "max",
        "train acc mean",
        "min",
        "test acc mean",
        "log V",
    ]
    ctx.add("## Draws from every simplex\n\n" + table(header, rows))
    rows = []
    for tag, entry in results["complexes"].items():
        rows.append(
            [
                tag,
                _mean(entry["modes_train"]["loss"]),
                _mean(entry["modes_train"]["accuracy"]),
                _mean(entry["mode_midpoints_train"]["loss"]),
                _mean(entry["mode_midpoints_train"]["accuracy"]),
                entry["log_volume"]["complex"],
                entry["ensemble_test_accuracy"],
            ]
        )
    header = [
        "complex",
        "modes train loss",
        "modes train acc",
        "mode midpoints loss",
        "midpoints acc",
        "log V complex",
        "ensemble test acc",
    ]
    ctx.add(
        "## Modes, straight-line midpoints between modes, and the complex\n\n"
        "The midpoint of two modes is what the complex must avoid: a straight line between "
        "independent modes crosses a loss barrier. log V is the natural log of the volume "
        "(the sum over simplexes for the complex).\n\n" + table(header, rows)
    )
    ctx.figure(
        fig,
        "loss_planes",
        "Train loss (log10) in planes through three points of the complexes: centre plus "
        "Gram–Schmidt basis, as in the paper.",
    )
