"""1-D regression with three clusters of inputs: predictive mean and ±2σ bands of a single
model, a deep ensemble and ESPRO, and test log-likelihood (paper Figure 10)."""

from __future__ import annotations

from typing import Any

import torch

from serving.predictive import regress
from training.data import _REGRESSION_CLUSTERS
from training.experiments.common import (
    SCALE_FIT,
    SCALE_FIT_UNCHECKED,
    draw,
    make_config,
    member_outputs,
    mode_states,
    scores,
    setup,
    split_outputs,
    train_simplexes,
)
from training.experiments.report import Context, pyplot, table

TITLE = "Regression: uncertainty bands on 1-D data with three input clusters"


def run(ctx: Context) -> dict[str, Any]:
    modes = ctx.size(2, 5)
    config = make_config(
        dataset="regression1d",
        architecture="mlp",
        kwargs={"hidden": [64, 64]},
        modes=modes,
        mode_epochs=ctx.size(10, 300),
        mode_lr=0.01,
        vertices=2,
        vertex_epochs=ctx.size(2, 60),
        vertex_lr=0.005,
        lam=0.1,
        batch_size=64,
        per_simplex=ctx.size(3, 10),
        seed=ctx.seed,
    )
    s = setup(config)
    with ctx.timed("training"):
        simplexes = train_simplexes(s)
    data = s.dataset
    mode_members = mode_states(simplexes)
    espro_members = [
        m
        for i, sm in enumerate(simplexes)
        for m in draw(s, sm.vertices, sm.buffers, config.draws.per_simplex, ctx.seed, i)[0]
    ]
    methods = {
        "single": mode_members[:1],
        f"deep ensemble ({modes})": mode_members,
        f"ESPRO ({modes} x 2-simplex)": espro_members,
    }
    grid = torch.linspace(-10, 10, 400).unsqueeze(1)
    gaps = (grid[:, 0].abs() > 2) & (grid[:, 0].abs() < 4)
    inside = torch.zeros_like(gaps)
    for lo, hi in _REGRESSION_CLUSTERS:
        inside |= (grid[:, 0] >= lo) & (grid[:, 0] <= hi)
    results: dict[str, Any] = {"scale_fit": SCALE_FIT, "methods": {}}
    curves = {}
    with ctx.timed("evaluation"):
        for name, members in methods.items():
            sc = scores(data, split_outputs(s, members), name)
            pred = regress(member_outputs(s, members, grid), variance_scale=sc["scale"])
            std = pred.variance.sqrt()
            epi = pred.epistemic.sqrt()
            curves[name] = (pred.mean, std)
            results["methods"][name] = {
                "members": len(members),
                "variance_scale": sc["scale"],
                "variance_scale_warning": sc["scale_warning"],
                "test_log_likelihood_raw": -sc["raw"]["nll"],
                "test_log_likelihood_calibrated": -sc["calibrated"]["nll"],
                "test_rmse": sc["calibrated"]["rmse"],
                "mean_std_in_clusters": float(std[inside].mean()),
                "mean_std_in_gaps": float(std[gaps].mean()),
                "mean_epistemic_std_in_clusters": float(epi[inside].mean()),
                "mean_epistemic_std_in_gaps": float(epi[gaps].mean()),
            }
    plt = pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), sharey=True)
    x = grid[:, 0].numpy()
    truth = torch.sin(grid[:, 0]) + 0.1 * grid[:, 0]
    for ax, (name, (mean, std)) in zip(axes, curves.items(), strict=True):
        ax.fill_between(
            x, (mean - 2 * std).numpy(), (mean + 2 * std).numpy(), alpha=0.3, label="±2σ"
        )
        ax.plot(x, mean.numpy(), label="mean")
        ax.plot(x, truth.numpy(), color="black", ls=":", lw=1, label="sin(x) + x/10")
        ax.scatter(data.train.x[:, 0], data.train.y, s=2, color="grey")
        ll = results["methods"][name]["test_log_likelihood_calibrated"]
        ax.set_title(f"{name}: test LL {ll:.3f}", fontsize=9)
        ax.set_ylim(-4, 4)
        ax.legend(fontsize=7, loc="lower right")
    ctx.add(_describe(results))
    ctx.figure(fig, "bands", "Predictive mean and ±2σ bands.")
    ctx.add(_table(results))
    return results


def _describe(results: dict[str, Any]) -> str:
    fit = results.get("scale_fit", SCALE_FIT_UNCHECKED)
    return (
        "An MLP (2 hidden layers of 64) with a Gaussian output; inputs are drawn from three "
        "clusters. Bands are the mixture's mean ± 2 standard deviations (aleatoric plus "
        f"epistemic), after a variance scale {fit}. Test inputs come from the same clusters, "
        "so the test log-likelihood does not see the gaps; the σ columns compare the "
        "predictive spread in the gaps between clusters (|x| in (2, 4)) with the spread inside "
        "them."
    )


def _table(results: dict[str, Any]) -> str:
    """The scores table, and where each ensemble's epistemic spread is larger."""
    rows = [
        [
            name,
            r["members"],
            r["test_log_likelihood_raw"],
            r["test_log_likelihood_calibrated"],
            r["test_rmse"],
            r["mean_std_in_clusters"],
            r["mean_std_in_gaps"],
            r["mean_epistemic_std_in_clusters"],
            r["mean_epistemic_std_in_gaps"],
        ]
        for name, r in results["methods"].items()
    ]
    header = ["method", "members", "test LL raw", "test LL cal", "RMSE"]
    header += ["σ clusters", "σ gaps", "epistemic σ clusters", "epistemic σ gaps"]
    spread = [
        f"{name} {r['mean_epistemic_std_in_gaps']:.3f} against "
        f"{r['mean_epistemic_std_in_clusters']:.3f} ("
        + (
            "larger"
            if r["mean_epistemic_std_in_gaps"] > r["mean_epistemic_std_in_clusters"]
            else "smaller"
        )
        + " in the gaps)"
        for name, r in results["methods"].items()
        if r["members"] > 1
    ]
    warnings = [
        f" Variance scale warning, {name}: {r['variance_scale_warning']}."
        for name, r in results["methods"].items()
        if r.get("variance_scale_warning")
    ]
    return (
        table(header, rows)
        + "\n\nEpistemic σ in the gaps against inside the clusters: "
        + "; ".join(spread)
        + "."
        + "".join(warnings)
    )
