"""Tests for serving.simplex: uniform Dirichlet draws and mixing vertex weights."""

from __future__ import annotations

import pytest
import torch

from serving.simplex import mix_vertices, sample_dirichlet


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_vertices", [1, 2, 3, 7])
def test_draws_lie_on_the_simplex(num_vertices: int) -> None:
    alpha = sample_dirichlet(num_vertices, 500, _gen(0))
    assert alpha.shape == (500, num_vertices)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(500, dtype=alpha.dtype))


def test_draws_are_reproducible_with_a_seeded_generator() -> None:
    first = sample_dirichlet(3, 20, _gen(7))
    assert torch.equal(first, sample_dirichlet(3, 20, _gen(7)))
    assert not torch.equal(first, sample_dirichlet(3, 20, _gen(8)))


def test_draws_match_uniform_dirichlet_moments() -> None:
    n, draws = 3, 10_000
    alpha = sample_dirichlet(n, draws, _gen(0))
    # Dirichlet(1, ..., 1): mean 1/n, variance (n - 1) / (n² (n + 1)), covariance -1/(n² (n + 1)).
    mean, var, cov = 1 / n, (n - 1) / (n**2 * (n + 1)), -1 / (n**2 * (n + 1))
    expected_mean = torch.full((n,), mean, dtype=alpha.dtype)
    torch.testing.assert_close(alpha.mean(dim=0), expected_mean, atol=0.01, rtol=0)
    expected_var = torch.full((n,), var, dtype=alpha.dtype)
    torch.testing.assert_close(alpha.var(dim=0), expected_var, atol=0.003, rtol=0)
    covariance = torch.cov(alpha.T)
    off_diagonal = covariance[~torch.eye(n, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, cov), atol=0.003, rtol=0)
    # The marginal of a coordinate is Beta(1, n - 1): P(X > 1/2) = (1/2)^(n - 1).
    tail = (alpha[:, 0] > 0.5).double().mean().item()
    assert tail == pytest.approx(0.5 ** (n - 1), abs=0.015)


def test_zero_draws_and_invalid_arguments() -> None:
    assert sample_dirichlet(4, 0).shape == (0, 4)
    with pytest.raises(ValueError, match="num_vertices >= 1"):
        sample_dirichlet(0, 5)
    with pytest.raises(ValueError, match="num_draws >= 0"):
        sample_dirichlet(3, -1)


def _vertices() -> list[dict[str, torch.Tensor]]:
    gen = _gen(1)
    return [
        {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(3, generator=gen)}
        for _ in range(3)
    ]


@pytest.mark.parametrize("j", [0, 1, 2])
def test_one_hot_alpha_returns_that_vertex(j: int) -> None:
    vertices = _vertices()
    alpha = [0.0, 0.0, 0.0]
    alpha[j] = 1.0
    mixed = mix_vertices(vertices, alpha)
    assert mixed.keys() == vertices[j].keys()
    for name, tensor in vertices[j].items():
        torch.testing.assert_close(mixed[name], tensor, atol=0, rtol=0)


def test_equal_weights_give_the_centroid() -> None:
    vertices = _vertices()
    mixed = mix_vertices(vertices, torch.full((3,), 1 / 3, dtype=torch.float64))
    for name in ("w", "b"):
        centroid = torch.stack([v[name] for v in vertices]).mean(dim=0)
        torch.testing.assert_close(mixed[name], centroid)


def test_general_alpha_is_the_weighted_sum() -> None:
    vertices = _vertices()
    alpha = [0.2, 0.5, 0.3]
    mixed = mix_vertices(vertices, alpha)
    for name in ("w", "b"):
        expected = sum(a * v[name] for a, v in zip(alpha, vertices, strict=True))
        torch.testing.assert_close(mixed[name], expected)


def test_single_vertex_is_returned_unchanged() -> None:
    vertex = _vertices()[0]
    mixed = mix_vertices([vertex], [1.0])
    assert all(torch.equal(mixed[name], vertex[name]) for name in vertex)


@pytest.mark.parametrize("alpha", [[0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
def test_mismatched_lengths_raise(alpha: list[float]) -> None:
    with pytest.raises(ValueError, match=f"{len(alpha)} coordinates for 3 vertices"):
        mix_vertices(_vertices(), alpha)
