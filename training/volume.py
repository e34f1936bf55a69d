"""Simplex volume from the small matrix of squared distances (Cayley–Menger).

Only the ``(k+1) × (k+1)`` matrix of squared distances between vertices is formed, never a
dense copy of the vertices, and it is accumulated and solved in float64 so that networks with
millions of parameters neither overflow nor underflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def squared_distances(vertices: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``D_ij = ‖θ_i − θ_j‖²`` over all parameters, in float64; differentiable."""
    n = len(vertices)
    device = next(iter(vertices[0].values())).device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    rows = [[zero] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            rows[i][j] = rows[j][i] = sum(
                (vertices[i][name].double() - vertices[j][name].double()).pow(2).sum()
                for name in vertices[i]
            )
    return torch.stack([torch.stack(r) for r in rows])


def squared_norm(params: Mapping[str, torch.Tensor]) -> float:
    """``‖θ‖²`` over all parameters, accumulated in float64."""
    return sum(float(v.detach().double().pow(2).sum()) for v in params.values())


def _check(sq_dist: torch.Tensor) -> int:
    n = sq_dist.shape[0]
    if sq_dist.dim() != 2 or sq_dist.shape != (n, n) or n < 2:
        raise ValueError(
            f"expected a square matrix of squared distances between at least 2 vertices, "
            f"got shape {list(sq_dist.shape)}"
        )
    return n - 1


def _scaled_squared_volume(d: torch.Tensor) -> torch.Tensor:
    """``V²`` of a simplex with squared edge lengths ``d`` (already of order one)."""
    n = d.shape[0]
    k = n - 1
    cm = torch.ones(n + 1, n + 1, dtype=torch.float64, device=d.device)
    cm[0, 0] = 0.0
    index = torch.arange(1, n + 1, device=d.device)
    cm = cm.index_put((index.unsqueeze(1), index), d)
    coefficient = (-1) ** (k + 1) / (2**k * math.factorial(k) ** 2)
    return (coefficient * torch.linalg.det(cm)).clamp(min=0.0)


def log_volume_from_distances(sq_dist: torch.Tensor) -> torch.Tensor:
    """``log V²`` of the simplex with squared edge lengths ``sq_dist`` (``-inf`` if degenerate).

    ``V² = (−1)^(k+1) det(CM) / (2^k (k!)²)`` where ``CM`` is ``sq_dist`` bordered by ones.
    The matrix is divided by its largest entry ``c`` first (``V²`` scales as ``c^k``), so the
    result is accurate over any range of distances.
    """
    k = _check(sq_dist)
    d = sq_dist.to(torch.float64)
    scale = d.detach().max()
    if scale <= 0:
        return torch.tensor(-math.inf, dtype=torch.float64)
    return torch.log(_scaled_squared_volume(d / scale)) + k * torch.log(scale)


def squared_height(sq_dist: torch.Tensor) -> torch.Tensor:
    """Squared distance of the last vertex from the affine hull of the others.

    ``V_k = V_{k−1} · h / k``, so ``h² = k² V²_k / V²_{k−1}``; for an edge, ``h² = D_01``.
    Raises if the other vertices are themselves degenerate.
    """
    k = _check(sq_dist)
    d = sq_dist.to(torch.float64)
    if k == 1:
        return d[0, 1]
    scale = d.detach().max()
    face = _scaled_squared_volume(d[:-1, :-1] / scale)
    if face <= 0:
        raise ValueError("the face opposite the last vertex is degenerate")
    return k**2 * _scaled_squared_volume(d / scale) / face * scale


def log_volume(vertices: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``log V²`` of the simplex spanned by parameter dictionaries."""
    return log_volume_from_distances(squared_distances(vertices))
