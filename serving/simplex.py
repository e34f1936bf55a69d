"""Points of a simplex in weight space: Dirichlet coordinates and the weights they mix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def sample_dirichlet(
    num_vertices: int, num_draws: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``[num_draws, num_vertices]`` points uniformly on the probability simplex.

    Uniform on the simplex is Dirichlet(1, …, 1): normalised independent Exp(1) draws.
    """
    if num_vertices < 1 or num_draws < 0:
        raise ValueError(
            f"expected num_vertices >= 1 and num_draws >= 0, got {num_vertices} and {num_draws}"
        )
    exp = torch.empty(num_draws, num_vertices, dtype=torch.float64).exponential_(
        1.0, generator=generator
    )
    return exp / exp.sum(dim=1, keepdim=True)


def mix_vertices(
    vertices: Sequence[Mapping[str, torch.Tensor]], alpha: torch.Tensor | Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weights ``w(α) = Σ_j α_j θ_j``, one α shared by every parameter of the network."""
    if len(vertices) != len(alpha):
        raise ValueError(f"{len(alpha)} coordinates for {len(vertices)} vertices")
    names = vertices[0].keys()
    return {
        name: sum(float(a) * v[name] for a, v in zip(alpha, vertices, strict=True))
        if len(vertices) > 1
        else vertices[0][name]
        for name in names
    }
